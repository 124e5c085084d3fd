"""mHC post-mix: new[k] = post[k] * x + sum_j comb[j, k] * residual[j], per token, fp32 then bf16.

Reference: parity.reference.model.Block.hc_post
"""

import torch

from parity.optimized.ops.registry import Impl


def hc_post_torch(x, residual, post, comb):
    # x: [T, D], residual: [T, hc, D], post: [T, hc], comb: [T, hc, hc] -> [T, hc, D]
    y = post.unsqueeze(-1) * x.unsqueeze(-2) + torch.sum(comb.unsqueeze(-1) * residual.unsqueeze(-2), dim=1)
    return y.type_as(x)


IMPLS = {
    "torch": Impl(hc_post_torch),
    # the twin's op order exactly: products rounded alone, the j sum in order, post * x added last, one bf16 rounding
    "triton": Impl("parity.optimized.ops.triton.hc_post:hc_post"),
}

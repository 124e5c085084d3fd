"""mHC pre-mix: collapse the hc residual streams of every token into one sublayer input.

Reference: parity.reference.model.Block.hc_pre (same ops; the fp32 mixer GEMM runs per request, see dense_linear)
"""

import torch

from parity.optimized.ops.dense_linear import dense_linear_torch
from parity.reference import kernels


def hc_pre_torch(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    # x: [T, hc, D] bf16 -> y: [T, D] bf16, post: [T, hc] fp32, comb: [T, hc, hc] fp32
    shape, dtype = x.size(), x.dtype
    x = x.flatten(1).float()  # [T, hc*D]
    rsqrt = torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    mixes = dense_linear_torch(x, hc_fn, cu_seqlens) * rsqrt  # [T, (2+hc)*hc]
    pre, post, comb = kernels.hc_split_sinkhorn(mixes[None], hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps)
    y = torch.sum(pre[0].unsqueeze(-1) * x.view(shape), dim=1)
    return y.to(dtype), post[0], comb[0]


IMPLS = {"torch": hc_pre_torch}

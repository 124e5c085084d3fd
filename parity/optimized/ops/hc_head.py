"""mHC head: collapse the final streams with sigmoid weights (before the final norm and the logits).

Reference: parity.reference.model.hc_head (ParallelHead.hc_head), called here on one request's tokens at a time as
`[1, s, hc, D]`: the fp32 mixer GEMM and the vectorized sigmoid see the per-request reference's shapes.
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import hc_head


def hc_head_torch(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_eps):
    # x: [T, hc, D] -> [T, D]
    params = (hc_fn, hc_scale, hc_base, norm_eps, hc_eps)
    return torch.cat([hc_head(x[a:b][None], *params)[0] for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])])


IMPLS = {"torch": Impl(hc_head_torch)}

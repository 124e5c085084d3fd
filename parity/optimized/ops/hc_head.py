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


IMPLS = {
    "torch": Impl(hc_head_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.hc_head:hc_head",
        bitwise=False,
        tolerance=(
            "float64 golden: within the twin's own error + 1 bf16 ulp + the fp32 collapse's absolute rounding, "
            "2^-24 * sum_j |pre_j x_j| * (4 + 8 + |scale| * S), S = rsqrt * sum|x fn| (visible only where the 4 "
            "terms cancel): the mixer GEMM and the sigmoid's exp round differently from the twin's in the last fp32 "
            "bits (GEMM order, float64 exp vs expf / CPU sigmoid)"
        ),
    ),
}

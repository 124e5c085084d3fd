"""mHC pre-mix: collapse the hc residual streams of every token into one sublayer input.

Reference: parity.reference.model.hc_pre (Block.hc_pre), called here on one request's tokens at a time as
`[1, s, hc, D]`: the fp32 mixer GEMM and, on CUDA, the row mean depend on how many rows share the call (see
dense_linear and rms_norm).
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import hc_pre


def hc_pre_torch(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    # x: [T, hc, D] bf16 -> y: [T, D] bf16, post: [T, hc] fp32, comb: [T, hc, hc] fp32
    params = (hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps)
    parts = [hc_pre(x[a:b][None], *params) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return tuple(torch.cat([p[i][0] for p in parts]) for i in range(3))


IMPLS = {
    "torch": Impl(hc_pre_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.hc_pre:hc_pre",
        bitwise=False,
        tolerance=(
            "float64 goldens, beyond the twin's own error: post / comb (fp32) + 8 / 16 ulp (the fp32 Sinkhorn's 40 "
            "divisions leave ~13 even from exactly rounded mixes) + the logit error of a mixer GEMM rounded at "
            "2^-24 of its absolute sum S = rsqrt * sum|x fn|: |scale[1]| * S ulp on post, 2 * |scale[2]| * max S on "
            "comb (the GEMM cannot follow the twin's BLAS order; the twin itself is 15-180 ulp off on comb); y "
            "(bf16) + 1 ulp + the fp32 collapse's absolute rounding 2^-24 * sum_j |pre_j x_j| * (4 + pre's own "
            "allowance), visible only where the 4 terms cancel"
        ),
    ),
}

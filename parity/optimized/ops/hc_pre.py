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


IMPLS = {"torch": Impl(hc_pre_torch)}

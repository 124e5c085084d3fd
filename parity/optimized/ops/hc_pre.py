"""mHC pre-mix: collapse the hc residual streams of every token into one sublayer input.

Reference: parity.reference.model.Block.hc_pre, run on one request's tokens at a time (the fp32 mixer GEMM and,
on CUDA, the row mean both depend on how many rows share the call; see dense_linear and rms_norm)
"""

import torch
import torch.nn.functional as F

from parity.reference import kernels


def _hc_pre(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    shape, dtype = x.size(), x.dtype
    x = x.flatten(1).float()  # [s, hc*D]
    rsqrt = torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    mixes = F.linear(x, hc_fn) * rsqrt  # [s, (2+hc)*hc]
    pre, post, comb = kernels.hc_split_sinkhorn(mixes[None], hc_scale, hc_base, hc_mult, sinkhorn_iters, hc_eps)
    y = torch.sum(pre[0].unsqueeze(-1) * x.view(shape), dim=1)
    return y.to(dtype), post[0], comb[0]


def hc_pre_torch(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
    # x: [T, hc, D] bf16 -> y: [T, D] bf16, post: [T, hc] fp32, comb: [T, hc, hc] fp32
    params = (hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps)
    parts = [_hc_pre(x[a:b], *params) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


IMPLS = {"torch": hc_pre_torch}

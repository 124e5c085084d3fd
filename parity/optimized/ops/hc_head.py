"""mHC head: collapse the final streams with sigmoid weights (before the final norm and the logits).

Reference: parity.reference.model.ParallelHead.hc_head, applied to one request's tokens at a time: the fp32 mixer
GEMM and the vectorized sigmoid see the same tensor shapes as in the per-request reference.
"""

import torch

from parity.optimized.ops.dense_linear import dense_linear_torch


def _hc_head_one(x, hc_fn, hc_scale, hc_base, norm_eps, hc_eps):
    shape, dtype = x.size(), x.dtype
    x = x.flatten(1).float()
    rsqrt = torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)
    mixes = dense_linear_torch(x, hc_fn, (0, x.shape[0])) * rsqrt  # [s, hc]
    pre = torch.sigmoid(mixes * hc_scale + hc_base) + hc_eps
    y = torch.sum(pre.unsqueeze(-1) * x.view(shape), dim=1)
    return y.to(dtype)


def hc_head_torch(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_eps):
    # x: [T, hc, D] -> [T, D]
    parts = [
        _hc_head_one(x[a:b], hc_fn, hc_scale, hc_base, norm_eps, hc_eps)
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])
    ]
    return torch.cat(parts)


IMPLS = {"torch": hc_head_torch}

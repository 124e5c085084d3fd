"""Sparse MQA over KV rows gathered from several sources (the chunk's own KV, the window ring, paged entries).

Reference: parity.reference.kernels.sparse_attn. `idx` addresses the rows of the virtual concatenation of
`sources` (-1 = none); the torch backend gathers each query's rows and runs the reference kernel on them, which is
per query identical to the reference call (same rows, same order, same 64-slot blocks).
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference import kernels


def gather_rows(sources: tuple[torch.Tensor, ...], idx: torch.Tensor) -> torch.Tensor:
    """Rows of the virtual concatenation of `sources` ([R_i, d] each) at `idx` ([...]); -1 gives zeros."""
    out = sources[0].new_zeros(*idx.shape, sources[0].shape[-1])
    base = 0
    for src in sources:
        sel = (idx >= base) & (idx < base + src.shape[0])
        out[sel] = src[idx[sel] - base]
        base += src.shape[0]
    return out


def sparse_attn_torch(q, sources, idx, attn_sink, softmax_scale):
    # q: [T, h, d], idx: [T, K] int64 -> [T, h, d]
    t, k = idx.shape
    kv = gather_rows(sources, idx)  # [T, K, d]
    local = torch.arange(k, device=idx.device).expand(t, k)
    local = torch.where(idx >= 0, local, -1).to(torch.int32)[:, None]  # [T, 1, K]
    return kernels.sparse_attn(q[:, None], kv, attn_sink, local, softmax_scale)[:, 0]


IMPLS = {
    "torch": Impl(sparse_attn_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.sparse_attn:sparse_attn",
        bitwise=False,
        tolerance="same 64-slot blocks, running max, bf16 P and fp32 denominator as the twin, but its MMAs round "
        "partial sums in the hardware's order (the twin sums exactly) and its exp is ~1 ulp: a P within a few fp32 "
        "ulp of a bf16 rounding midpoint may round the other way (spec §12.3), moving its head's outputs by one bf16 "
        "ulp of P*v/l, and outputs that nearly cancel (|o| << sum|P v|/l) carry fp32 summation noise (bounded by "
        "2^-18 sum|P v|/l in the tests); every other output is within the twin's error + 1 bf16 ulp of the float64 "
        "math",
    ),
}

"""Unquantized linear (fp32 or bf16 weights) over ragged tokens: y[T, N] = x[T, K] . w[N, K]^T.

Reference: the `F.linear` calls of parity.reference.model (hc mixers, compressor wkv/wgate, gate, head,
indexer weights_proj), each made on one request's `[s, K]` tokens.

The torch backend calls F.linear once per sequence segment: BLAS picks a gemv kernel for one or two rows and a
gemm kernel for more, and the two sum K in different orders (measured on CPU: fp32 rows differ at M = 1, 2).
Calling per request reproduces the per-request reference bit for bit. A fused backend may batch all tokens.
"""

import torch
import torch.nn.functional as F

from parity.optimized.ops.registry import Impl

# the triton backend's fp32 form (tf32x3: split operands on TF32 tensor cores) drops at most ~10 units of 2^-23 |a b|
# per product (`triton.dense_linear.linear` derives it); its tolerance allows this many on top of fp32 summation
TF32X3_UNITS = 16


def dense_linear_torch(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: tuple[int, ...]) -> torch.Tensor:
    # x: [T, K] -> [T, N], segments [cu[i], cu[i+1])
    if len(cu_seqlens) == 2:
        return F.linear(x, weight)
    parts = [F.linear(x[a:b], weight) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return torch.cat(parts) if parts else x.new_empty(0, weight.shape[0])


IMPLS = {
    "torch": Impl(dense_linear_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.dense_linear:dense_linear",
        bitwise=False,
        tolerance=(
            "fp32 x fp32 as tf32x3 (three TF32 tensor-core products of split operands, each within 16 * 2^-23 of "
            "the exact product; the interpreter: exact products), bf16 x bf16 exact on tensor cores; fp32 sums in a "
            "K-chunked order that is the same for every batch instead of BLAS's per-shape order: per element "
            "within the twin's distance to the float64 product plus (K + 16) * 2^-23 of the terms' absolute sum "
            "plus 1 ulp of the output dtype"
        ),
    ),
}

"""Triton `hadamard`: Sylvester-order Walsh-Hadamard transform of the last dim times a scale.

Reference: parity.reference.kernels.hadamard_transform (`fast_hadamard_transform.hadamard_transform`, spec §3.7).

One program transforms a `[rows, d]` tile in fp32 with the official butterfly order: stage b pairs element i with
i + 2^b inside blocks of 2^(b+1) and maps (lo, hi) to (lo + hi, lo - hi), strides 1, 2, 4, ... lowest first (each
stage is a reshape to `[rows, d / 2s, 2, s]`, a split of the pair axis and a join back, no arithmetic other than the
one fp32 add or subtract per element); then one multiply by the fp32 scale and one round-to-nearest-even to the
output dtype. Each output is therefore the same sequence of fp32 roundings as the twin's (and the CUDA kernel's),
bit for bit (`bitwise=True`). There is no product to contract into an fma: (lo + hi) * scale has no a*b+c form.

Unverified without a GPU: speed (the reshapes/permutes of each stage may cost register shuffles or shared-memory
round trips on sm_90); the CUDA tests check the bits.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton._quant import as_rows


@triton.constexpr_function
def _stride(i, log_d, reversed_stages):
    # (a compile-time function: a constexpr assigned to a name inside a static_range loop becomes a tensor)
    return 1 << (log_d - 1 - i if reversed_stages else i)


@triton.jit
def butterflies(x, BR: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr, REVERSED: tl.constexpr):
    """x fp32 `[BR, D]` -> its unnormalized Walsh-Hadamard transform per row: LOG_D butterfly stages (lo + hi,
    lo - hi), lowest stride first (REVERSED: highest first, the tests' planted bug)."""
    for i in tl.static_range(LOG_D):
        # stage i: stride s = 2^i, blocks of 2s; the pair axis moved last
        y = tl.reshape(x, [BR, D // (2 * _stride(i, LOG_D, REVERSED)), 2, _stride(i, LOG_D, REVERSED)])
        y = tl.permute(y, (0, 1, 3, 2))
        lo, hi = tl.split(y)
        y = tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2))
        x = tl.reshape(y, [BR, D])
    return x


@triton.jit
def _hadamard_kernel(
    x_ptr, y_ptr, R, x_row_stride, scale, D: tl.constexpr, LOG_D: tl.constexpr, BR: tl.constexpr,
    REVERSED: tl.constexpr = False,
):  # fmt: skip
    # REVERSED: a planted-bug hook for the tests (highest stride first); always False in the op
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    cols = tl.arange(0, D).to(tl.int64)
    mask = (rows < R)[:, None]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = butterflies(x, BR, D, LOG_D, REVERSED)
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], (x * scale).to(y_ptr.dtype.element_ty), mask=mask)


def hadamard(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The `Hadamard` contract: `[..., d]` (d a power of two) -> same shape and dtype."""
    return hadamard_planted(x, scale)


def hadamard_planted(x: torch.Tensor, scale: float = 1.0, reversed_stages: bool = False) -> torch.Tensor:
    """hadamard with the tests' planted-bug hook (`reversed_stages`: butterflies highest stride first)."""
    d = x.size(-1)
    if d & (d - 1):
        raise ValueError(f"hadamard_transform: last dim {d} is not a power of two")
    rows = as_rows(x)
    if rows is None:
        rows = x.reshape(-1, d).contiguous()
    r = rows.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if r == 0 or d == 0:
        return out
    budget = 1 << 15 if runtime.interpreting() else 2048
    br = min(max(1, budget // d), runtime.next_pow2(r))
    _hadamard_kernel[(runtime.cdiv(r, br),)](
        rows, out, r, rows.stride(0), scale, D=d, LOG_D=d.bit_length() - 1, BR=br, REVERSED=reversed_stages
    )
    return out

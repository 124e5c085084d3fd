"""Device functions and host helpers shared by the quantizer kernels (act_quant, kv_fake_quant, fp4_fake_quant).

Every function here is exact bit arithmetic or one IEEE rounding, written the way the official TileLang kernels
compute it (spec §3.2-3.3), so a kernel built from them is bit for bit the torch twin
(`parity.reference.kernels.act_quant` / `fp4_act_quant`, `parity.formats.pow2_ceil` / `round_to_e2m1`):

- `pow2_ceil_exp(v)`: ceil(log2 v) of a positive normal fp32 from its IEEE bits (the unbiased exponent, plus one if
  any mantissa bit is set), never `log2`/`ceil` on floats (spec §12.6);
- `exp2i(e)`: 2^e built by writing e + 127 into the exponent field (exact for -126 <= e <= 127), so x / 2^e is
  computed as x * 2^-e: the same correctly rounded result as an IEEE division by a power of two, without relying on
  how the compiler lowers fp32 `/` (Triton's default fp32 division is not IEEE on every target);
- `round_e2m1(v)`: fp32 to the e2m1 grid with ties to the even code and saturation at 6, sign kept (so -0.25 -> -0),
  the table of spec §3.3 as comparisons (CUDA `__nv_cvt_float_to_fp4(.., cudaRoundNearest)`).
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime


# (the exponent arithmetic is int64: the same instructions' worth on the GPU for one value per group, and the CPU
# interpreter skips its costly int32 overflow checks)
@triton.jit
def pow2_ceil_exp(v):
    """int64 e = ceil(log2 v) for positive normal fp32 v, from the bits."""
    bits = v.to(tl.int32, bitcast=True)
    return ((bits >> 23) & 0xFF).to(tl.int64) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int64)


@triton.jit
def exp2i(e):
    """fp32 2^e for integer -126 <= e <= 127 (exact)."""
    return ((e.to(tl.int64) + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def round_e2m1(v):
    """fp32 -> fp32 on the e2m1 grid: nearest, ties to the even code, saturating at +-6, sign bit kept."""
    a = tl.abs(v)
    mag = tl.where(a <= 5.0, 4.0, 6.0)
    mag = tl.where(a < 3.5, 3.0, mag)
    mag = tl.where(a <= 2.5, 2.0, mag)
    mag = tl.where(a < 1.75, 1.5, mag)
    mag = tl.where(a <= 1.25, 1.0, mag)
    mag = tl.where(a < 0.75, 0.5, mag)
    mag = tl.where(a <= 0.25, 0.0, mag)
    sign = v.to(tl.int32, bitcast=True) & -2147483648
    return (mag.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


def as_rows(x: torch.Tensor) -> torch.Tensor | None:
    """x `[..., N]` as a `[R, N]` view of the same memory (unit stride along N), or None if the leading dims do not
    collapse to one row stride (then the caller works on a contiguous copy)."""
    if x.dim() == 0:
        return None
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return None
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        return None
    return rows


def group_tiles(n_groups: int, block: int, n_rows: int) -> tuple[int, int]:
    """(rows per program, groups per program) for a [rows, groups, block] quantizer tile.

    Compiled: about 4096 elements per program (memory bound, many programs to fill the GPU). Interpreted: one big
    tile (the interpreter pays per program and per op, not per element)."""
    budget = 1 << 16 if runtime.interpreting() else 4096
    bg = min(runtime.next_pow2(max(n_groups, 1)), max(1, budget // block))
    br = max(1, budget // (bg * block))
    br = min(br, runtime.next_pow2(max(n_rows, 1)))
    return br, bg

"""Triton `fp4_fake_quant`: in-place FP4 e2m1 fake-quant per 32-group with ue8m0 scales (indexer q and entries).

Reference: parity.reference.kernels.fp4_act_quant (inplace=True; the official `fp4_act_quant_kernel`, spec §3.3).

One program handles a `[rows, groups, block]` tile; per group, exactly the official steps: amax = max|x| in fp32
floored at the fp32 value 6 * 2^-126, v = amax * fl32(1/6), s = 2^ceil(log2 v) from the IEEE bits, x / s computed
as x * 2^-e (exact), clamp to +-6, round to the e2m1 grid with ties to the even code (the spec §3.3 table as
comparisons, sign bit kept so -0.25 -> -0), times s, RNE to bf16, written back in place through the row stride.
Every step is exact or one IEEE rounding: bit for bit the twin (`bitwise=True`).

Not covered: non-finite inputs (as act_quant). Nothing here depends on the GPU's conversion instructions (the e2m1
rounding is comparisons, the final bf16 cast is `cvt.rn`), so the CPU interpreter runs the GPU's arithmetic; the
CUDA tests confirm it.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton._quant import as_rows, exp2i, group_tiles, pow2_ceil_exp, round_e2m1


@triton.jit
def fp4_fake(x, SCALE_SHIFT: tl.constexpr):
    """Groups x fp32 `[R, G, BLOCK]` -> on the e2m1 grid times the group scale 2^ceil(log2(amax / 6)) (amax floor
    6 * 2^-126), round to nearest even, saturating at 6."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=2), 6.0 * 2.0**-126)
    e = pow2_ceil_exp(amax * (1.0 / 6.0)) + SCALE_SHIFT
    y = tl.minimum(tl.maximum(x * exp2i(-e)[:, :, None], -6.0), 6.0)
    return round_e2m1(y) * exp2i(e)[:, :, None]


@triton.jit
def _fp4_group_kernel(
    x_ptr, R, NG, row_stride, BLOCK: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr, SCALE_SHIFT: tl.constexpr = 0
):
    # SCALE_SHIFT: a planted-bug hook for the tests (added to the scale exponent); always 0 in the op
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    groups = tl.program_id(1).to(tl.int64) * BG + tl.arange(0, BG).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mask = (rows < R)[:, None, None] & (groups < NG)[None, :, None]
    offs = rows[:, None, None] * row_stride + groups[None, :, None] * BLOCK + cols[None, None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # [BR, BG, BLOCK]
    tl.store(x_ptr + offs, fp4_fake(x, SCALE_SHIFT).to(x_ptr.dtype.element_ty), mask=mask)


def fp4_fake_quant(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The `Fp4FakeQuant` contract: in place on bf16 `[..., n]`; returns x."""
    return fp4_fake_quant_planted(x, block)


def fp4_fake_quant_planted(x: torch.Tensor, block: int = 32, scale_shift: int = 0) -> torch.Tensor:
    """fp4_fake_quant with the tests' planted-bug hook (`scale_shift` added to every scale exponent)."""
    n = x.size(-1)
    assert n % block == 0, f"fp4_act_quant: last dim {n} is not a multiple of block_size {block}"
    assert block & (block - 1) == 0, f"fp4_fake_quant (triton): block {block} is not a power of two"
    rows = as_rows(x)
    if rows is None:
        tmp = x.contiguous()
        fp4_fake_quant_planted(tmp, block, scale_shift)
        x.copy_(tmp)
        return x
    r = rows.shape[0]
    if r == 0 or n == 0:
        return x
    ng = n // block
    br, bg = group_tiles(ng, block, r)
    _fp4_group_kernel[(runtime.cdiv(r, br), runtime.cdiv(ng, bg))](
        rows, r, ng, rows.stride(0), BLOCK=block, BR=br, BG=bg, SCALE_SHIFT=scale_shift
    )
    return x

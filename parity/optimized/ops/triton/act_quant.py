"""Triton `act_quant`: block-wise FP8 e4m3 quantization of the last dim with ue8m0 (power-of-two) scales.

Reference: parity.reference.kernels.act_quant (the official TileLang `act_quant_kernel`, spec §3.2).

One program quantizes a `[rows, groups, block]` tile; per group, exactly the official steps: amax = max|x| in fp32
(exact from bf16), floored at the fp32 literal 1e-4; v = amax * fl32(1/448) (a multiply by the rounded reciprocal,
not a division); with `scale_fmt` the scale is 2^ceil(log2 v) from the IEEE bits, and x / s is computed as x * 2^-e
(exact, the same rounding as the division); without it s = v and x / s is an IEEE division (`div_rn`). Then
clamp(+-448) and a round-to-nearest-even cast to e4m3 (`cvt.rn.satfinite`; the clamp makes saturation moot). The
scale is stored as its e8m0 byte (exact for a power of two) or as fp32. Every step is exact or one IEEE rounding,
so the output is bit for bit the twin's (`bitwise=True`).

The same kernel serves the in-place fake-quant (`inplace=True`, and `kv_fake_quant`): x <- bf16(fp32(e4m3(x/s)) * s)
written back through x's row stride, or, for the initial official revision, the inner cast to bf16 instead of e4m3
(`MODE` 2: an identity in practice, reproduced rather than skipped).

Not covered: non-finite inputs (an infinite amax gives an infinite scale whose 2^-e does not exist; bf16
activations of the model are finite). Unverified without a GPU: that Triton's fp32 -> e4m3 cast on sm_90 is
`cvt.rn.satfinite` (the CPU interpreter is patched to that semantics); the CUDA tests check it.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton._quant import as_rows, exp2i, group_tiles, pow2_ceil_exp

FP8_MAX = 448.0

QUANTIZE, FAKE_E4M3, FAKE_BF16 = 0, 1, 2


@triton.jit
def fp8_scaled(x, ROUND_SCALE: tl.constexpr, SCALE_SHIFT: tl.constexpr):
    """Groups x fp32 `[R, G, BLOCK]` -> (x / s clamped to +-448, s `[R, G]`, e `[R, G]` the exponent of s = 2^e when
    ROUND_SCALE): the exact amax (floor 1e-4), the fp32-literal reciprocal multiply, the power-of-two scale from the
    IEEE bits (or s = amax / 448 and the IEEE division)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=2), 1e-4)  # [R, G]
    v = amax * (1.0 / 448.0)
    if ROUND_SCALE:
        e = pow2_ceil_exp(v) + SCALE_SHIFT
        s = exp2i(e)
        y = x * exp2i(-e)[:, :, None]
    else:
        e = tl.zeros(v.shape, dtype=tl.int64)  # unused: no power-of-two scale
        s = v
        y = tl.math.div_rn(x, s[:, :, None])
    return tl.minimum(tl.maximum(y, -448.0), 448.0), s, e


@triton.jit
def fake_round(y, MODE: tl.constexpr):
    """The fake-quant's rounding of scaled values: to e4m3 (`FAKE_E4M3`) or to bf16 (`FAKE_BF16`), back to fp32."""
    if MODE == 1:
        return y.to(tl.float8e4nv).to(tl.float32)
    else:
        return y.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _fp8_group_kernel(
    x_ptr, y_ptr, s_ptr, yp_ptr, R, NG, x_row_stride, y_row_stride,
    BLOCK: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr,
    ROUND_SCALE: tl.constexpr, MODE: tl.constexpr, S_E8M0: tl.constexpr, PAIRS: tl.constexpr = False,
    SCALE_SHIFT: tl.constexpr = 0,
):  # fmt: skip
    # PAIRS: also store y in the pairs order into yp (`quantize`'s `pairs`); SCALE_SHIFT: a planted-bug hook for the
    # tests (added to the scale exponent); always 0 in the op
    # int64 index math: no int32 overflow for large tensors (and the interpreter skips its int32 overflow checks)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    groups = tl.program_id(1).to(tl.int64) * BG + tl.arange(0, BG).to(tl.int64)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    mask = (rows < R)[:, None, None] & (groups < NG)[None, :, None]
    within = groups[None, :, None] * BLOCK + cols[None, None, :]  # [1, BG, BLOCK]
    x_offs = rows[:, None, None] * x_row_stride + within
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)  # [BR, BG, BLOCK]

    y, s, e = fp8_scaled(x, ROUND_SCALE, SCALE_SHIFT)

    if MODE == 0:
        y_offs = rows[:, None, None] * y_row_stride + within
        tl.store(y_ptr + y_offs, y.to(tl.float8e4nv), mask=mask)
        if PAIRS:  # element 2b + h of each 32-run at position 16 h + b of the run (`_gemm_common.pairs_order`)
            run_pos = (cols // 32) * 32 + (cols % 2) * 16 + (cols % 32) // 2
            yp_offs = rows[:, None, None] * y_row_stride + groups[None, :, None] * BLOCK + run_pos[None, None, :]
            tl.store(yp_ptr + yp_offs, y.to(tl.float8e4nv), mask=mask)
        s_offs = rows[:, None] * NG + groups[None, :]
        s_mask = (rows < R)[:, None] & (groups < NG)[None, :]
        if S_E8M0:
            tl.store(s_ptr + s_offs, (e + 127).to(tl.uint8), mask=s_mask)
        else:
            tl.store(s_ptr + s_offs, s, mask=s_mask)
    else:
        tl.store(x_ptr + x_offs, (fake_round(y, MODE) * s[:, :, None]).to(x_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, block_size: int, scale_fmt, scale_dtype) -> None:
    n = x.size(-1)
    assert n % block_size == 0, f"act_quant: last dim {n} is not a multiple of block_size {block_size}"
    assert block_size & (block_size - 1) == 0, f"act_quant (triton): block_size {block_size} is not a power of two"
    if scale_fmt is None and scale_dtype == torch.float8_e8m0fnu:
        raise ValueError("act_quant: e8m0 scales need scale_fmt='ue8m0' (the official model never mixes them)")


def fake_quant_fp8(x: torch.Tensor, block_size: int, scale_fmt, scale_dtype, mode: int, scale_shift=0):
    """In place: x <- bf16(round(x / s) * s) per `block_size` group, rounded through e4m3 (`FAKE_E4M3`) or bf16
    (`FAKE_BF16`, the initial revision). Writes through x's strides; returns x."""
    _check(x, block_size, scale_fmt, scale_dtype)
    rows = as_rows(x)
    if rows is None:  # leading dims that do not collapse: quantize a contiguous copy and write it back
        tmp = x.contiguous()
        fake_quant_fp8(tmp, block_size, scale_fmt, scale_dtype, mode, scale_shift)
        x.copy_(tmp)
        return x
    _launch(rows, rows, rows, block_size, scale_fmt is not None, mode, False, scale_shift)
    return x


def _launch(rows, y, s, block, round_scale, mode, e8m0, scale_shift, yp=None):
    r, n = rows.shape
    if r == 0 or n == 0:
        return
    ng = n // block
    br, bg = group_tiles(ng, block, r)
    grid = (runtime.cdiv(r, br), runtime.cdiv(ng, bg))
    _fp8_group_kernel[grid](
        rows, y, s, y if yp is None else yp, r, ng, rows.stride(0), n,
        BLOCK=block, BR=br, BG=bg, ROUND_SCALE=round_scale, MODE=mode, S_E8M0=e8m0, PAIRS=yp is not None,
        SCALE_SHIFT=scale_shift,
    )  # fmt: skip


def act_quant(
    x: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
    inplace: bool = False,
):
    """The `ActQuant` contract: bf16 `[..., N]` -> (e4m3 `[..., N]`, scales `[..., N/block]` in `scale_dtype`), or x
    itself after the in-place fake-quant."""
    return quantize(x, block_size, scale_fmt, scale_dtype, inplace)


def quantize(x, block_size, scale_fmt, scale_dtype, inplace=False, scale_shift=0, pairs=False):
    """act_quant with the tests' planted-bug hook (`scale_shift` added to every scale exponent). `pairs`: also the
    e4m3 values in the pairs order the FP4 tiles read (`_gemm_common.pairs_order`, the same bytes), stored by the same
    launch, returned third (moe_experts: no copy launch of its own)."""
    if inplace:
        return fake_quant_fp8(x, block_size, scale_fmt, scale_dtype, FAKE_E4M3, scale_shift)
    _check(x, block_size, scale_fmt, scale_dtype)
    n = x.size(-1)
    rows = as_rows(x)
    if rows is None:
        rows = x.reshape(-1, n).contiguous()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    e8m0 = scale_dtype == torch.float8_e8m0fnu
    s = torch.empty(*x.shape[:-1], n // block_size, dtype=torch.uint8 if e8m0 else torch.float32, device=x.device)
    assert not pairs or block_size % 32 == 0, f"act_quant: the pairs order needs 32-runs, block_size {block_size}"
    yp = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device) if pairs else None
    _launch(rows, y, s, block_size, scale_fmt is not None, QUANTIZE, e8m0, scale_shift, yp)
    if e8m0:
        s = s.view(torch.float8_e8m0fnu)
    elif scale_dtype != torch.float32:
        s = s.to(scale_dtype)
    return (y, s, yp) if pairs else (y, s)

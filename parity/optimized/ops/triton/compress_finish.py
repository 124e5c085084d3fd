"""Triton `compress_finish`: a compressor's new entries from their pooled values in one program per entry (the cast
to bf16, RMSNorm, RoPE, then Hadamard + FP4 fake-quant or the FP8 fake-quant of the non-rope dims), where the
unfused path launches five to six kernels and a table gather per compressor and step.

Reference: parity.reference.model.Compressor.forward after the pooling; the op's torch form (`ops/compress_finish.py`)
is that code. Each stage is the arithmetic of the registered Triton op it replaces, in the same order, with the
same roundings (the shared `@triton.jit` helpers of those kernels: `inv_rms`, `rotate_pairs`, `butterflies`,
`fp8_scaled` and `fake_round`, `fp4_fake`), and the values pass between stages rounded to bf16 as they do through
memory there:
- `rms_norm`: float64 sum of squares (exact for bf16 inputs), r = 1/sqrt(ss/d + eps) in float64 rounded once to
  fp32, `w * (x * r)` unfused, to bf16 (eps and d as run-time arguments, as there);
- `rope`: interleaved pairs of the last rd dims, `fma(xr, c, -(xi*s))` / `fma(xr, s, xi*c)` on CUDA and the unfused
  products in the interpreter (the rope kernel's FUSED), to bf16;
- `kv_fake_quant` (act_quant's group kernel, blocks of 64, non-rope dims): amax floor 1e-4, the power-of-two scale
  from the IEEE bits (or the IEEE division without `scale_fmt`), clamp, e4m3 (or bf16) rounding, times the scale;
- `hadamard` (butterflies, lowest stride first, times d^-1/2 as an fp32 argument, to bf16) then `fp4_fake_quant`
  (blocks of 32, floor 6 * 2^-126, scale 2^ceil(log2(amax/6)), e2m1 round to nearest even, times the scale).
Every stage is exact or one IEEE rounding on a row, so the bits equal those kernels run in sequence
(`tests/optimized/ops/test_compress_finish.py`); launched with fp contraction off (rms_norm's launch setting; the
other stages have no multiply-add to contract). Unverified without a GPU: the speed; the CUDA tests check the bits.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton.act_quant import fake_round, fp8_scaled
from parity.optimized.ops.triton.fp4_fake_quant import fp4_fake
from parity.optimized.ops.triton.hadamard import butterflies
from parity.optimized.ops.triton.rms_norm import inv_rms
from parity.optimized.ops.triton.rope import rotate_pairs


@triton.jit
def _finish_kernel(
    pooled_ptr, w_ptr, f_ptr, pos_ptr, out_ptr, M, N, eps, h_scale, stride_f,
    D: tl.constexpr, RD: tl.constexpr, BM: tl.constexpr, ROTATE: tl.constexpr, LOG_D: tl.constexpr,
    ROUND_SCALE: tl.constexpr, FP8: tl.constexpr, FUSED: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)  # entries
    rmask = (rows < M)[:, None]
    cols = tl.arange(0, D)[None, :]
    x = tl.load(pooled_ptr + rows[:, None] * D + cols, mask=rmask, other=0.0)
    y = finish_rows(x, rows, rows < M, w_ptr, f_ptr, pos_ptr, N, eps, h_scale, stride_f,
                    D, RD, BM, ROTATE, LOG_D, ROUND_SCALE, FP8, FUSED, PLANT)  # fmt: skip
    tl.store(out_ptr + rows[:, None] * D + cols, y.to(tl.bfloat16), mask=rmask)


@triton.jit
def finish_rows(
    x, rows, valid, w_ptr, f_ptr, pos_ptr, N, eps, h_scale, stride_f,
    D: tl.constexpr, RD: tl.constexpr, BM: tl.constexpr, ROTATE: tl.constexpr, LOG_D: tl.constexpr,
    ROUND_SCALE: tl.constexpr, FP8: tl.constexpr, FUSED: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    """pooled fp32 `[BM, D]` (entries `rows`, those in use `valid`, RoPE positions at `pos_ptr[rows]`) -> the
    entries `[BM, D]`, fp32 holding bf16 values. PLANT (tests only): 1 = RoPE on the first rd dims instead of the
    last, 2 = no bf16 rounding after the norm."""
    x = x.to(tl.bfloat16).to(tl.float32)
    rmask = valid[:, None]
    cols = tl.arange(0, D)[None, :]
    # rms_norm: [BM, D]
    x64 = x.to(tl.float64)
    ss = tl.sum(x64 * x64, axis=1)
    r = inv_rms(ss, N, eps)[:, None]
    w = tl.load(w_ptr + cols).to(tl.float32)
    y = w * (x * r)
    if PLANT != 2:
        y = y.to(tl.bfloat16).to(tl.float32)
    # rope on the pairs of the last RD dims (interleaved (2i, 2i+1)), at each entry's table row
    HALF: tl.constexpr = D // 2
    FIRST: tl.constexpr = (D - RD) // 2  # the first rope pair
    xr, xi = tl.split(tl.reshape(y, [BM, HALF, 2]))
    j = tl.arange(0, HALF)[None, :]
    if PLANT == 1:
        rope = j < RD // 2
        fj = j
    else:
        rope = j >= FIRST
        fj = j - FIRST
    f_row = f_ptr + tl.load(pos_ptr + rows, mask=valid, other=0).to(tl.int64)[:, None] * stride_f
    c = tl.load(f_row + 2 * fj, mask=rope & rmask, other=0.0)
    s = tl.load(f_row + 2 * fj + 1, mask=rope & rmask, other=0.0)
    re, im = rotate_pairs(xr, xi, c, s, FUSED)
    re = tl.where(rope, re.to(tl.bfloat16).to(tl.float32), xr)
    im = tl.where(rope, im.to(tl.bfloat16).to(tl.float32), xi)
    y = tl.reshape(tl.join(re, im), [BM, D])
    if ROTATE:
        y = butterflies(y, BM, D, LOG_D, False)
        y = fp4_fake(tl.reshape((y * h_scale).to(tl.bfloat16).to(tl.float32), [BM, D // 32, 32]), 0)
    else:
        g = tl.reshape(y, [BM, D // 64, 64])
        q, sc, _ = fp8_scaled(g, ROUND_SCALE, 0)
        q = fake_round(q, 1 if FP8 else 2)
        nope = (tl.arange(0, D // 64) < (D - RD) // 64)[None, :, None]
        y = tl.where(nope, q * sc[:, :, None], g)
    return tl.reshape(y, [BM, D])


def compress_finish(pooled, weight, eps, segments, freqs_cis, positions, rotate, scale_fmt, scale_dtype, fp8):
    """The `CompressFinish` contract (`ops/compress_finish.py`); `segments` is not needed (rows are independent)."""
    return launch(pooled, weight, eps, freqs_cis, positions, rotate, scale_fmt, fp8)


def launch(pooled, weight, eps, freqs_cis, positions, rotate, scale_fmt, fp8, plant: int = 0) -> torch.Tensor:
    """The kernel behind `compress_finish`; `plant` (tests only): 1 rotates the first rd dims, 2 skips the bf16
    rounding of the normed entries."""
    m, d = pooled.shape
    rd = 2 * freqs_cis.shape[-1]
    assert d & (d - 1) == 0 and d >= 64 and (d - rd) % 64 == 0, f"compress_finish: head dim {d}, rope dims {rd}"
    out = torch.empty(m, d, dtype=torch.bfloat16, device=pooled.device)
    if m == 0:
        return out
    f = torch.view_as_real(freqs_cis)  # [S, rd/2, 2] fp32
    if f.stride(-2) != 2 or f.stride(-1) != 1:
        f = f.contiguous()
    # one entry per program on the GPU (a step completes few); the interpreter pays per program: a block of them
    bm = min(runtime.next_pow2(m), 64) if runtime.interpreting() else 1
    _finish_kernel[(runtime.cdiv(m, bm),)](
        pooled.contiguous(), weight.contiguous(), f, positions, out, m, d, float(eps), d**-0.5, f.stride(0),
        D=d, RD=rd, BM=bm, ROTATE=bool(rotate), LOG_D=d.bit_length() - 1, ROUND_SCALE=scale_fmt is not None,
        FP8=bool(fp8), FUSED=pooled.device.type == "cuda", PLANT=plant, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out

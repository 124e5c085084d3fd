"""Triton rope: interleaved RoPE in place on a bf16 view, one rotation per token from its own table row (spec §5.2).

Reference: parity.reference.model.apply_rotary_emb

Pairs (2i, 2i+1) of the last dim are (real, imag); they are multiplied by the token's complex64 table entry
(c, s), or by its conjugate (c, -s) for the inverse, in fp32, and written back with RNE. The twin multiplies with
torch's complex64 product, whose rounding depends on the device, and the kernel follows the device it runs on:
- CUDA contracts the product into FMAs, real = fma(xr, c, -(xi*s)), imag = fma(xr, s, xi*c) (spec §5.2, verified
  on H100): the kernel issues exactly those `tl.fma`s;
- CPU computes it with separate rounded products, (xr*c - xi*s, xr*s + xi*c) (the vectorized c10::complex
  multiply; measured equal for every tensor size here, whatever the CPU capability): the kernel computes that
  expression when its tensors are on the CPU (the interpreter), launched with `enable_fp_fusion=False`.
Bitwise with the twin on both. x may be any strided view whose last dim is contiguous ([T, r] or [T, h, r]).
Each program rotates whole rows: a contiguous [rows, r] tile split into its pairs in registers.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime


@triton.jit
def rotate_pairs(xr, xi, c, s, FUSED: tl.constexpr):
    """The pairs (xr, xi) times (c + i s), fp32: as fma's on CUDA (FUSED: the complex64 multiply CUDA's torch runs),
    the separately rounded products elsewhere (what CPU torch computes; launched with fp contraction off)."""
    if FUSED:
        return tl.fma(xr, c, -(xi * s)), tl.fma(xr, s, xi * c)
    else:
        return xr * c - xi * s, xr * s + xi * c


@triton.jit
def _rope_kernel(
    x_ptr, f_ptr, R, H, stride_t, stride_h, stride_f,
    HALF: tl.constexpr, BR: tl.constexpr, INVERSE: tl.constexpr, FUSED: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # (token, head) pairs
    rmask = rows < R
    rows = rows.to(tl.int64)
    tok = rows // H
    x_row = x_ptr + (tok * stride_t + (rows % H) * stride_h)[:, None]
    mask = rmask[:, None]
    if PLANT == 1:  # planted bug: non-interleaved pairs (i, i + r/2)
        i = tl.arange(0, HALF)[None, :]
        xr = tl.load(x_row + i, mask=mask, other=0.0).to(tl.float32)
        xi = tl.load(x_row + i + HALF, mask=mask, other=0.0).to(tl.float32)
    else:
        # the row as one contiguous [BR, r] tile split into its (2i, 2i+1) pairs: coalesced, vectorized loads
        # and stores (two stride-2 loads and stores of single elements ran at ~5 % of HBM bandwidth)
        xr, xi = tl.split(tl.reshape(tl.load(x_row + tl.arange(0, 2 * HALF)[None, :], mask=mask, other=0.0),
                                     [BR, HALF, 2]).to(tl.float32))  # fmt: skip
    f_row = f_ptr + (tok * stride_f)[:, None] + tl.arange(0, 2 * HALF)[None, :]
    c, s = tl.split(tl.reshape(tl.load(f_row, mask=mask, other=0.0), [BR, HALF, 2]))
    if INVERSE:
        s = -s
    re, im = rotate_pairs(xr, xi, c, s, FUSED)
    if PLANT == 1:
        tl.store(x_row + i, re.to(tl.bfloat16), mask=mask)
        tl.store(x_row + i + HALF, im.to(tl.bfloat16), mask=mask)
    else:
        y = tl.reshape(tl.join(re, im), [BR, 2 * HALF]).to(tl.bfloat16)
        tl.store(x_row + tl.arange(0, 2 * HALF)[None, :], y, mask=mask)


def launch(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False, plant: int = 0) -> torch.Tensor:
    """The kernel behind `rope`; `plant=1` (tests only) rotates non-interleaved pairs."""
    if x.dtype != torch.bfloat16 or x.dim() not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(f"rope: x must be a bf16 [T, r] / [T, h, r] view with unit stride in r, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")  # fmt: skip
    T, r = x.shape[0], x.shape[-1]
    h = x.shape[1] if x.dim() == 3 else 1
    half = r // 2
    if r % 2 or half & (half - 1) or freqs_cis.shape != (T, half):
        raise ValueError(f"rope: rotary dim {r} (a power of two pairs) and table {tuple(freqs_cis.shape)} != "
                         f"({T}, {half})")  # fmt: skip
    if T * h == 0:
        return x
    f = torch.view_as_real(freqs_cis)  # [T, half, 2] fp32
    if f.stride(-2) != 2 or f.stride(-1) != 1:
        f = f.contiguous()
    stride_h = x.stride(1) if x.dim() == 3 else 0
    br = max(1, min((1 << 16 if runtime.interpreting() else 2048) // half, runtime.next_pow2(T * h)))
    _rope_kernel[(runtime.cdiv(T * h, br),)](
        x, f, T * h, h, x.stride(0), stride_h, f.stride(0), HALF=half, BR=br, INVERSE=bool(inverse),
        FUSED=x.device.type == "cuda", PLANT=plant, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return x


def rope(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """In place on a bf16 view x [T, r] / [T, h, r]; freqs_cis complex64 [T, r/2], each token's table row."""
    return launch(x, freqs_cis, inverse)

"""Triton rms_norm: `w * (x * rsqrt(mean(x^2) + eps))` over the last dim, fp32 math, cast back (spec §4.2).

Reference: parity.reference.model.rms_norm (RMSNorm.forward)

One program normalizes BM rows. The sum of squares is taken in float64 (exact products; the sum of a row's
squares is exact for all practical inputs, so its bits do not depend on a summation order), and r =
1/sqrt(sum/N + eps) is evaluated in float64 and rounded once to fp32. Then the twin's own fp32 op order: x * r
first, the weight applied after, each product rounded, then the cast to x's dtype (RNE).

Not bitwise: the twin rounds its mean in the order of torch's fp32 reduction (vectorized cascade on CPU, a
block tree on CUDA, which also depends on the number of rows) and takes an fp32 rsqrt (two roundings on CPU,
rsqrtf on CUDA), so r can differ from the kernel's in the last fp32 bits. Tolerance, against the float64 math:
bf16 outputs within the twin's own error + 1/2 ulp (both round values within ~1e-7 of it, so the kernel can only
be further at a rounding midpoint), fp32 outputs + 3 ulp (three fp32 roundings: r, x * r, w * (x * r)). Rows are
independent: no segments needed. Unverified without a GPU: the speed (`bench/triton_mhc.py`).
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime


@triton.jit
def inv_rms(ss, n, eps):
    """1 / sqrt(ss / n + eps) of a float64 sum of squares `ss` over n values, in float64 (IEEE sqrt and division),
    rounded once to fp32."""
    return (1.0 / tl.sqrt(ss / n + eps)).to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, eps, BM: tl.constexpr, BN: tl.constexpr, ONE_CHUNK: tl.constexpr,
    PLANT: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < M
    base = rows.to(tl.int64)[:, None] * N
    if ONE_CHUNK:
        cols = tl.arange(0, BN)[None, :]
        mask = rmask[:, None] & (cols < N)
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        x64 = x.to(tl.float64)
        ss = tl.sum(x64 * x64, axis=1)
    else:
        ss = tl.zeros([BM], dtype=tl.float64)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)[None, :]
            x64 = tl.load(x_ptr + base + cols, mask=rmask[:, None] & (cols < N), other=0.0).to(tl.float64)
            ss += tl.sum(x64 * x64, axis=1)
    if PLANT == 1:  # planted bug: the mean taken over the padded block width instead of the row length
        r = inv_rms(ss, BN, eps)[:, None]
    else:
        r = inv_rms(ss, N, eps)[:, None]
    if ONE_CHUNK:
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + cols, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)[None, :]
            mask = rmask[:, None] & (cols < N)
            x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            tl.store(out_ptr + base + cols, (w * (x * r)).to(out_ptr.dtype.element_ty), mask=mask)


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float, out=None, plant: int = 0) -> torch.Tensor:
    """The kernel behind `rms_norm`; `plant=1` (tests only) divides by the padded block width."""
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return out
    bn = min(runtime.next_pow2(n), 8192)
    per_program = 1 << 16 if runtime.interpreting() else 4096  # interpreted: few, big programs
    bm = max(1, min(per_program // bn, runtime.next_pow2(m)))
    _rms_norm_kernel[(runtime.cdiv(m, bm),)](
        x2, weight.contiguous(), out, m, n, float(eps), BM=bm, BN=bn, ONE_CHUNK=bn >= n, PLANT=plant,
        num_warps=4 if bn * bm <= 4096 else 8, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, segments=None, out=None) -> torch.Tensor:
    """x [..., N] (bf16 or fp32), weight [N] -> x's shape and dtype. `segments` is not needed (rows are normalized
    alone). `out`: optional contiguous buffer of x's shape and dtype to write."""
    return launch(x, weight, eps, out)

"""Triton head_norm: per-head unit RMS of the queries with the twin's bf16 rounding points, in place (spec §5.3).

Reference: parity.reference.model.Attention.forward (`q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)`
on bf16 tensors)

The twin is five bf16 tensor ops, each rounded to bf16: q^2; its mean (accumulated in fp32, divided in fp32, then
rounded); + eps (computed in fp32); rsqrt (fp32, then rounded); q * r. The kernel keeps all five rounding points:
the square of a bf16 value is exact in fp32 and rounded to bf16; the sum of the bf16 squares is taken in float64
(exact for all practical inputs) and rounded once to fp32, then divided by d in fp32 (IEEE); eps is added in fp32;
the rsqrt is the device's fp32 rsqrt (`tl.rsqrt`: rsqrtf on CUDA like torch's CUDA kernel, 1/sqrt with two
roundings on CPU like torch's vectorized CPU kernel); q * r is exact in fp32 and rounded once.

Not bitwise: the twin's fp32 sum follows torch's reduction order (a bf16 mean differs from the exactly rounded
sum's in rare heads), and on CPU torch finishes the tail of each per-request tensor in scalar code whose rsqrt
rounds sqrt to bf16 first (~30% of those tail heads differ). Tolerance: judged against the float64-exact model of
the five bf16 steps, the kernel is never further from it than the twin (0 ulp); a kernel that skips a bf16
rounding point (fp32 math) is 1 bf16 ulp off it in a third of the elements and fails. Unverified without a GPU:
the speed, and that the CUDA twin's rsqrt is the same rsqrtf instruction (the GPU test asserts the tolerance).
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime


@triton.jit
def _head_norm_kernel(
    q_ptr, R, H, d, stride_t, stride_h, eps,
    BR: tl.constexpr, BD: tl.constexpr, FP32_STEPS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BR + tl.arange(0, BR)  # (token, head) pairs
    rmask = rows < R
    rows = rows.to(tl.int64)
    base = (rows // H) * stride_t + (rows % H) * stride_h
    cols = tl.arange(0, BD)
    mask = rmask[:, None] & (cols < d)[None, :]
    ptrs = q_ptr + base[:, None] + cols[None, :]
    q = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if FP32_STEPS:  # planted bug: the same math in fp32, rounded to bf16 only at the end
        s = tl.sum((q * q).to(tl.float64), axis=1).to(tl.float32)
        r = (1.0 / tl.sqrt((tl.div_rn(s, d * 1.0) + eps).to(tl.float64))).to(tl.float32)
    else:
        sq = (q * q).to(tl.bfloat16)
        s = tl.sum(sq.to(tl.float64), axis=1).to(tl.float32)
        mean = tl.div_rn(s, d * 1.0).to(tl.bfloat16)
        t = (mean.to(tl.float32) + eps).to(tl.bfloat16)
        r = tl.rsqrt(t.to(tl.float32)).to(tl.bfloat16).to(tl.float32)  # the device's fp32 rsqrt, as torch's
    tl.store(ptrs, (q * r[:, None]).to(tl.bfloat16), mask=mask)


def launch(q: torch.Tensor, eps: float, fp32_steps: bool = False) -> torch.Tensor:
    """The kernel behind `head_norm`; `fp32_steps` (tests only) plants the fp32-math bug."""
    if q.dtype != torch.bfloat16 or q.dim() != 3 or q.stride(-1) != 1:
        raise ValueError(f"head_norm: q must be bf16 [T, h, d] with unit stride in d, got {q.dtype} "
                         f"{tuple(q.shape)} strides {q.stride()}")  # fmt: skip
    T, h, d = q.shape
    if T * h == 0:
        return q
    bd = runtime.next_pow2(d)
    per_program = 1 << 16 if runtime.interpreting() else 4096
    br = max(1, min(per_program // bd, runtime.next_pow2(T * h)))
    _head_norm_kernel[(runtime.cdiv(T * h, br),)](
        q, T * h, h, d, q.stride(0), q.stride(1), float(eps), BR=br, BD=bd, FP32_STEPS=fp32_steps,
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return q


def head_norm(q: torch.Tensor, eps: float, cu_seqlens) -> torch.Tensor:
    """In place on bf16 q [T, h, d]. Heads are normalized alone, so `cu_seqlens` is not needed."""
    return launch(q, eps)

"""Grouped MoE experts: tokens sorted by expert, one batched SwiGLU FFN per expert, contributions accumulated in
fp32 per token in ascending expert id, plus the shared expert.

Reference: parity.reference.model.MoE.forward / Expert.forward. The quantized GEMMs are row-independent, so an
expert's batch composition does not change any token's result.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parity.optimized.ops.registry import Impl
from parity.reference.model import linear


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: (weight, scale) for w1, w2, w3; scale None for bf16 weights."""

    w1: tuple[torch.Tensor, torch.Tensor | None]
    w2: tuple[torch.Tensor, torch.Tensor | None]
    w3: tuple[torch.Tensor, torch.Tensor | None]
    swiglu_limit: float


def expert_forward(e: ExpertWeights, x, weights, scale_fmt, scale_dtype):
    dtype = x.dtype
    gate = linear(x, *e.w1, scale_fmt, scale_dtype).float()
    up = linear(x, *e.w3, scale_fmt, scale_dtype).float()
    if e.swiglu_limit > 0:
        up = torch.clamp(up, min=-e.swiglu_limit, max=e.swiglu_limit)
        gate = torch.clamp(gate, max=e.swiglu_limit)
    x = F.silu(gate) * up
    if weights is not None:
        x = weights * x
    return linear(x.to(dtype), *e.w2, scale_fmt, scale_dtype)


def moe_experts_torch(x, weights, indices, experts, shared, scale_fmt, scale_dtype):
    # x: [T, D] bf16, weights/indices: [T, k] -> [T, D] bf16
    y = torch.zeros_like(x, dtype=torch.float32)
    flat = indices.flatten().long()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    k = indices.shape[1]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        rows, slot = pairs // k, pairs % k
        y[rows] += expert_forward(experts[e], x[rows], weights[rows, slot, None], scale_fmt, scale_dtype)
    y += expert_forward(shared, x, None, scale_fmt, scale_dtype)
    return y.type_as(x)


IMPLS = {
    "torch": Impl(moe_experts_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.moe_experts:moe_experts",
        bitwise=False,
        tolerance=(
            "the twin's steps with the twin's rounding points (act_quant, FP4/FP8 block GEMMs in ascending K, bf16 "
            "GEMM outputs, fp32 clamp/SwiGLU/routing weight, bf16 h, act_quant, ascending-expert-id fp32 combine); "
            "only the block products (FP8 MMA / fp32 sum vs exact) and exp() in silu differ. Allowed: exactly the "
            "output changes those differences can reach, propagated stage by stage (a GEMM output within the block "
            "allowance, so possibly the neighbouring bf16 value; h within the resulting interval; any e4m3 value "
            "and scale its act_quant can then give; the w2 GEMM and the combine over them); zero elsewhere"
        ),
    ),
}

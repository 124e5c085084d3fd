"""MoE experts over flat tokens: the routed experts' SwiGLU FFNs accumulated in fp32 per token in ascending expert
id, plus the shared expert.

Reference: parity.reference.model.MoE.forward / Expert.forward; the torch backend runs their math
(`combine_experts`, `swiglu`) on the experts' weights. The quantized GEMMs are row-independent, so an expert's batch
composition does not change any token's result.
"""

from dataclasses import dataclass
from functools import partial

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import combine_experts, linear, swiglu


@dataclass(frozen=True)
class ExpertWeights:
    """One SwiGLU expert: (weight, scale) for w1, w2, w3; scale None for bf16 weights."""

    w1: tuple[torch.Tensor, torch.Tensor | None]
    w2: tuple[torch.Tensor, torch.Tensor | None]
    w3: tuple[torch.Tensor, torch.Tensor | None]
    swiglu_limit: float


def expert_forward(e: ExpertWeights, x, weights, scale_fmt, scale_dtype):
    """ref.Expert.forward with the expert's weights: x [n, D] (routing weights [n, 1] or None) -> [n, D]."""
    w1, w2, w3 = (
        partial(linear, weight=w, scale=s, scale_fmt=scale_fmt, scale_dtype=scale_dtype) for w, s in (e.w1, e.w2, e.w3)
    )
    return swiglu(x, w1, w2, w3, e.swiglu_limit, weights)


def moe_experts_torch(x, weights, indices, experts, shared, scale_fmt, scale_dtype):
    # x: [T, D] bf16, weights/indices: [T, k] -> [T, D] bf16
    def run(e: ExpertWeights):
        return lambda x, w=None: expert_forward(e, x, w, scale_fmt, scale_dtype)

    return combine_experts(x, weights, indices, [run(e) for e in experts], run(shared))


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

"""MoE routing: scores, expert choice (top-k with bias, or token-id hash), normalized and scaled weights.

Reference: parity.reference.model.route (Gate.forward), run on one request's tokens at a time (the fp32 GEMM and
the vectorized softplus then see the per-request shapes).
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import route


def moe_gate_torch(x, weight, bias, tid2eid, input_ids, topk, score_func, route_scale, cu_seqlens):
    # x: [T, D] -> weights [T, k] fp32, indices [T, k]
    params = (topk, score_func, route_scale)
    parts = [
        route(x[a:b], weight, bias, tid2eid, input_ids[a:b], *params) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


IMPLS = {
    "torch": Impl(moe_gate_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.moe_gate:moe_gate",
        bitwise=False,
        tolerance=(
            "scores from the same exact bf16 products summed in another fp32 order, the score function's exp / log "
            "within a few fp32 ulps: weights within the float64 math's first-order error bound (K * 2^-23 of the "
            "terms' absolute sum through the score function and the renormalization) of the twin; expert ids "
            "equal except where two biased scores lie within that bound of each other (a near tie: either is a "
            "correct top-k); hash-routed ids always equal"
        ),
    ),
}

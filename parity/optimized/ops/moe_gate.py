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


IMPLS = {"torch": Impl(moe_gate_torch)}

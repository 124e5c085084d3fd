"""MoE routing: scores, expert choice (top-k with bias, or token-id hash), normalized and scaled weights.

Reference: parity.reference.model.Gate.forward, run on one request's tokens at a time (the fp32 GEMM and the
vectorized softplus then see the per-request shapes).
"""

import torch
import torch.nn.functional as F


def _gate_one(x, weight, bias, tid2eid, input_ids, topk, score_func, route_scale):
    scores = F.linear(x.float(), weight.float())
    if score_func == "softmax":
        scores = scores.softmax(dim=-1)
    elif score_func == "sigmoid":
        scores = scores.sigmoid()
    else:
        scores = F.softplus(scores).sqrt()
    original_scores = scores
    if bias is not None:
        scores = scores + bias
    indices = tid2eid[input_ids] if tid2eid is not None else scores.topk(topk, dim=-1)[1]
    weights = original_scores.gather(1, indices)
    if score_func != "softmax":
        weights /= weights.sum(dim=-1, keepdim=True)
    weights *= route_scale
    return weights, indices


def moe_gate_torch(x, weight, bias, tid2eid, input_ids, topk, score_func, route_scale, cu_seqlens):
    # x: [T, D] -> weights [T, k] fp32, indices [T, k]
    parts = [
        _gate_one(x[a:b], weight, bias, tid2eid, input_ids[a:b], topk, score_func, route_scale)
        for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


IMPLS = {"torch": moe_gate_torch}

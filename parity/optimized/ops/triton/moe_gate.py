"""Triton MoE routing: fp32 scores of all experts, then one fused kernel for the score function, the bias-steered
top-k (or the token-id hash table), the renormalization and the route scale.

Reference: parity.reference.model.route (Gate.forward, spec §9.1).

Scores: x . W^T as `dense_linear`'s kernel runs it on the bf16 operands (the twin's `F.linear(x.float(), W.float())`
multiplies the same bf16 values: every product is exact in fp32, only the fp32 summation order differs), fp32 out,
one K-only order for every batch. Routing kernel, per token (spec §9.1): s = sqrt(softplus(score)) with torch's
softplus (score itself above 20, else log1p(exp(score)), log1p evaluated accurately), or softmax / sigmoid; the
top-k of s + bias by repeated argmax (largest first, ties to the lower expert id), or tid2eid[token] for hash
layers; the weights are the unbiased s of the chosen experts, divided by their sum (added in top-k order) unless
softmax, times route_scale, all fp32. Indices come back in the twin's dtype (int64 from top-k, tid2eid's int32).

Numerics vs the twin: the scores differ by fp32 summation order and the score function by exp / log ulps, so the
weights sit within a propagated bound of the float64 math, and where two experts' biased scores are closer than
that bound the other one of the two may be chosen (a near tie; the tests accept exactly those). `cu_seqlens` is
accepted and ignored: each token is routed alone. Unverified without a GPU: the performance.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton.dense_linear import linear

_FUNCS = {"sqrtsoftplus": 0, "softmax": 1, "sigmoid": 2}


@triton.jit(do_not_specialize=["T"])
def _route_kernel(
    s_ptr, bias_ptr, tid_ptr, ids_ptr, w_ptr, i_ptr,
    T, E, stride_s, ROUTE_SCALE,
    TOPK: tl.constexpr, KPAD: tl.constexpr, FUNC: tl.constexpr, HAS_BIAS: tl.constexpr, HASH: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    mask_t = offs_t < T
    mask_e = (offs_e < E)[None, :]
    x = tl.load(s_ptr + offs_t[:, None] * stride_s + offs_e[None, :], mask=mask_t[:, None] & mask_e, other=0.0)
    if FUNC == 1:  # softmax over the experts
        x = tl.where(mask_e, x, float("-inf"))
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        s = tl.div_rn(ex, tl.sum(ex, axis=1)[:, None])
    elif FUNC == 2:  # sigmoid as 1 / (1 + exp(-x))
        s = tl.div_rn(1.0, 1.0 + tl.exp(-x))
    else:  # sqrt(softplus(x)), torch's softplus: x above 20, else log1p(exp(x))
        u = tl.exp(tl.minimum(x, 20.0))
        y = 1.0 + u
        # log1p(u) = log(1 + u) * u / ((1 + u) - 1): accurate where 1 + u rounds (Goldberg); u itself below 2^-24
        log1p = tl.where(y == 1.0, u, tl.log(y) * tl.div_rn(u, y - 1.0))
        s = tl.sqrt_rn(tl.where(x > 20.0, x, log1p))
    sel = s
    if HAS_BIAS:
        sel = s + tl.load(bias_ptr + offs_e, mask=offs_e < E, other=0.0)[None, :]  # the bias steers the choice only
    sel = tl.where(mask_e, sel, float("-inf"))
    kcol = tl.arange(0, KPAD)[None, :]
    wk = tl.zeros((BLOCK_T, KPAD), dtype=tl.float32)
    ik = tl.zeros((BLOCK_T, KPAD), dtype=tl.int32)
    total = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        if HASH:
            tok = tl.load(ids_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
            idx = tl.load(tid_ptr + tok * TOPK + j, mask=mask_t, other=0).to(tl.int32)
        else:
            idx = tl.argmax(sel, axis=1, tie_break_left=True).to(tl.int32)
            sel = tl.where(offs_e[None, :] == idx[:, None], float("-inf"), sel)
        w = tl.sum(tl.where(offs_e[None, :] == idx[:, None], s, 0.0), axis=1)  # s of the chosen expert, exactly
        total += w  # in top-k order, as the twin's sum over the gathered [N, k] row
        wk = tl.where(kcol == j, w[:, None], wk)
        ik = tl.where(kcol == j, idx[:, None], ik)
    if FUNC != 1:
        wk = tl.div_rn(wk, total[:, None])
    wk = wk * ROUTE_SCALE
    mask = mask_t[:, None] & (kcol < TOPK)
    tl.store(w_ptr + offs_t[:, None] * TOPK + kcol, wk, mask=mask)
    tl.store(i_ptr + offs_t[:, None] * TOPK + kcol, ik.to(i_ptr.dtype.element_ty), mask=mask)


def moe_gate(x, weight, bias, tid2eid, input_ids, topk, score_func, route_scale, cu_seqlens=None):
    """Tokens bf16 `[T, D]` -> (routing weights fp32 `[T, k]`, expert ids `[T, k]`: int64, or tid2eid's dtype for
    hash routing). `cu_seqlens` is accepted for the op contract and ignored."""
    t = x.shape[0]
    n_exp = weight.shape[0]
    if score_func not in _FUNCS:
        raise ValueError(f"moe_gate: unknown score_func {score_func!r}")
    if x.dtype != weight.dtype:  # both to fp32 (exact for bf16): the fp32 GEMM then
        x, weight = x.float(), weight.float()
    scores = linear(x, weight, torch.float32)  # [T, E] fp32
    dev = x.device
    weights = common.empty(t, topk, dtype=torch.float32, device=dev)
    indices = common.empty(t, topk, dtype=tid2eid.dtype if tid2eid is not None else torch.int64, device=dev)
    if t == 0:
        return weights, indices
    block_e = runtime.next_pow2(n_exp)
    block_t = 64 if runtime.interpreting() else max(1, min(16, 4096 // block_e))
    dummy = scores  # pointer arguments that the constexpr flags never read
    with common.on_device(x):
        _route_kernel[(runtime.cdiv(t, block_t),)](
            scores, bias if bias is not None else dummy, tid2eid if tid2eid is not None else dummy,
            input_ids if tid2eid is not None else dummy, weights, indices,
            t, n_exp, scores.stride(0), float(route_scale),
            TOPK=topk, KPAD=runtime.next_pow2(topk), FUNC=_FUNCS[score_func], HAS_BIAS=bias is not None,
            HASH=tid2eid is not None, BLOCK_T=block_t, BLOCK_E=block_e,
        )  # fmt: skip
    return weights, indices

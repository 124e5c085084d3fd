"""Triton `indexer_topk`: FP4-simulated indexer scores of one request's queries against its compressed entries,
relu(q . k) weighted per head and summed over heads, then the top-k entries each query may see.

Reference: parity.reference.model.Indexer.forward (spec §7.2 steps 7-11: the bf16 einsum, relu, the bf16 product
with the head weights, the head sum with fp32 accumulation rounded to bf16, the causal mask, torch.topk).

Two kernels:
1. scores (one program per block of queries x block of entries): for all heads at once, S = q . E^T as a bf16
   MMA with fp32 accumulation, rounded to bf16 (the einsum's bf16 output), relu, times the bf16 head weight with
   one bf16 rounding (the twin's bf16 product; with fp32 weights the product stays fp32 like torch's promotion),
   summed over heads in fp32 and rounded once to bf16 (torch's sum of a bf16 tensor). The model's operands are
   FP4-grid values (e2m1 x 2^k per 32-group, spec §3.3) whose 128-term dot products are exact in fp32 in any
   order, so every score is bit for bit the twin's; the head sum's fp32 order is the only other freedom and cannot
   move a bf16 result unless an fp32 partial sum is inexact (terms 2^24 apart) and lands on a rounding midpoint.
2. top-k (programs per block of queries, or per (row, chunk) for long rows): entry j is visible to query r iff j <
   (start_pos + r + 1) // ratio (a prefill is start_pos 0: j < (r + 1) // ratio; the same rule as the twin's -inf
   mask and its per-token decode rows). Each visible (score, j) becomes an int64 key, score order in the high 32 bits
   (+0 and -0 equal), ~j in the low bits. Short rows: each key's rank is counted directly. Long rows: a tree of
   levels, one program per (row, chunk of keys) keeping the chunk's top KP with Triton's bitonic `tl.topk`, until one
   chunk is left (a decode row of 16k entries: its chunks run on as many SMs, where a single program merging chunk
   after chunk was serial). Output: the first k keys as entry ids in descending score order, -1 where a query sees
   fewer than k entries.

Ties: equal scores come out in ascending entry id (the key's low bits). torch.topk's order among equal values is
implementation-defined (CUDA gave descending ids on one row, spec §7.2 step 10; the CPU kernel differs by row
width): so the ids equal the twin's up to the order and choice among entries whose scores tie, which the tests
compare as sets modulo ties (`bitwise=False`).

Speed on the H200 (docs/perf-h200/triton_attention.md, 2026-12-03): a decode row of 16384 entries 0.09 ms (Flash,
k 512) / 0.15 ms (Pro, k 1024), 2.6x / 1.7x the torch backend (the single-program merge took 0.27 / 0.33 ms);
the scores and top-k of one row are latency bound (1 % of copy bandwidth), a 4k prefill is at ~40 %.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime

IDX_BITS = 31  # low key bits: ~entry id (entries < 2^31)


# per-step counts (entries, rows, k, position) are not specialized: a decode would compile a variant each time one
# crossed 1 or a multiple of 16 (H200 decode steps compiled kernels mid-run)
@triton.jit(do_not_specialize=["L", "T"])
def _scores_kernel(
    q_ptr, e_ptr, w_ptr, out_ptr, L, H, T, D,
    q_sl, q_sh, e_st, w_sl, w_sh,
    HP: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ents = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)
    heads = tl.arange(0, HP)
    dims = tl.arange(0, DP)
    rmask, hmask, dmask, emask = rows < L, heads < H, dims < D, ents < T
    q = tl.load(q_ptr + rows[:, None, None] * q_sl + heads[None, :, None] * q_sh + dims[None, None, :],
                mask=rmask[:, None, None] & hmask[None, :, None] & dmask[None, None, :], other=0.0)  # fmt: skip
    e = tl.load(e_ptr + ents[:, None] * e_st + dims[None, :], mask=emask[:, None] & dmask[None, :], other=0.0)
    s = tl.dot(tl.reshape(q, [BR * HP, DP]), tl.trans(e))  # [BR*HP, BT] fp32
    s = tl.reshape(s, [BR, HP, BT]).to(tl.bfloat16)  # the einsum's bf16 output
    s = tl.maximum(s, 0.0).to(tl.float32)
    w = tl.load(w_ptr + rows[:, None] * w_sl + heads[None, :] * w_sh, mask=rmask[:, None] & hmask[None, :], other=0.0)
    prod = s * w.to(tl.float32)[:, :, None]
    if W_BF16:
        prod = prod.to(tl.bfloat16).to(tl.float32)  # the bf16 x bf16 product
        total = tl.sum(prod, axis=1).to(tl.bfloat16).to(tl.float32)
    else:
        total = tl.sum(prod, axis=1)
    tl.store(out_ptr + rows[:, None] * T + ents[None, :], total, mask=rmask[:, None] & emask[None, :])


@triton.jit
def _keys(scores, ents, visible):
    # (score, entry) -> int64 key, larger = earlier in the output; invisible -> -1
    s = tl.where(scores == 0.0, 0.0, scores)  # -0 == +0 in torch.topk
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits < 0, ~bits, bits + 2147483648)  # monotone in the float value, in [0, 2^32)
    key = (order << 31) | (2147483647 - ents)
    return tl.where(visible, key, -1)


@triton.jit
def _visible(start_pos, rows, ratio, L, T):
    vis = tl.minimum((start_pos + rows + 1) // ratio, T)
    return tl.where(rows < L, vis, 0)


@triton.jit(do_not_specialize=["L", "T", "K", "start_pos"])
def _topk_rank_kernel(sc_ptr, out_ptr, L, T, K, start_pos, ratio, TP: tl.constexpr, BR: tl.constexpr):
    # all of a row's entries at once: each key's rank is the number of larger keys (keys are distinct: the entry id
    # is in them), and the entry goes to output column rank if rank < k. O(t^2) compares, no sorting network.
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    vis = _visible(start_pos, rows, ratio, L, T)
    ents = tl.arange(0, TP).to(tl.int64)
    visible = ents[None, :] < vis[:, None]
    sc = tl.load(sc_ptr + rows[:, None] * T + ents[None, :], mask=visible, other=0.0)
    keys = _keys(sc, ents[None, :], visible)  # [BR, TP]
    rank = tl.sum((keys[:, None, :] > keys[:, :, None]).to(tl.int32), axis=2)  # [BR, TP]
    tl.store(out_ptr + rows[:, None] * K + rank, ents[None, :], mask=visible & (rank < K))
    # columns past the row's visible count: none
    cols = tl.arange(0, TP)
    pad = (cols[None, :] >= vis[:, None]) & (cols < K)[None, :] & (rows < L)[:, None]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], tl.full([BR, TP], -1, tl.int64), mask=pad)


@triton.jit(do_not_specialize=["T", "W", "K", "start_pos"])
def _topk_tree_kernel(
    src_ptr, out_ptr, T, W, K, start_pos, ratio,
    KP: tl.constexpr, C: tl.constexpr, FROM_SCORES: tl.constexpr, FINAL: tl.constexpr,
):  # fmt: skip
    # one program per (query row, chunk of C keys): the chunk's top KP keys, sorted descending (Triton's bitonic
    # top-k). The first level makes the keys from a row's scores (width T), later ones read the previous level's
    # [rows, W] keys; the final level (one chunk left) writes entry ids
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    pos = chunk.to(tl.int64) * C + tl.arange(0, C).to(tl.int64)
    if FROM_SCORES:
        visible = pos < tl.minimum((start_pos + row + 1) // ratio, T)
        sc = tl.load(src_ptr + row * T + pos, mask=visible, other=0.0)
        keys = _keys(sc, pos, visible)
    else:
        keys = tl.load(src_ptr + row * W + pos, mask=pos < W, other=-1)
    best = tl.reshape(tl.topk(tl.reshape(keys, [1, C]), KP, dim=1), [KP])
    cols = tl.arange(0, KP)
    if FINAL:
        ids = tl.where(best >= 0, 2147483647 - (best & 2147483647), -1)
        tl.store(out_ptr + row * K + cols, ids, mask=cols < K)
    else:
        tl.store(out_ptr + (row * tl.num_programs(1) + chunk) * KP + cols, best)


def index_scores(q: torch.Tensor, entries: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[L, t]` fp32 scores (bf16 values when the weights are bf16): the twin's head-summed relu scores."""
    n, h, d = q.shape
    t = entries.shape[0]
    out = torch.empty(n, t, dtype=torch.float32, device=q.device)
    if n == 0 or t == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    if entries.stride(1) != 1:
        entries = entries.contiguous()
    hp, dp = triton.next_power_of_2(h), max(16, triton.next_power_of_2(d))
    if runtime.interpreting():
        br = min(triton.next_power_of_2(n), max(1, 256 // hp))
        bt = min(max(16, triton.next_power_of_2(t)), 256)
    else:
        br = max(1, 64 // hp) if hp < 64 else 1  # at least 64 MMA rows per program
        bt = 64
    grid = (triton.cdiv(n, br), triton.cdiv(t, bt))
    _scores_kernel[grid](
        q, entries, weights, out, n, h, t, d,
        q.stride(0), q.stride(1), entries.stride(0), weights.stride(0), weights.stride(1),
        HP=hp, DP=dp, BR=br, BT=bt, W_BF16=weights.dtype == torch.bfloat16,
    )  # fmt: skip
    return out


def indexer_topk(
    q, entries, weights, k: int, start_pos: int, ratio: int, method: str | None = None, chunk: int | None = None
) -> torch.Tensor:
    """The `IndexerTopk` contract: q bf16 `[L, h, d]`, entries bf16 `[t, d]`, weights `[L, h]` -> entry ids
    `[L, k]` int64 (-1 none), each row in descending score order (ties: ascending id).

    `method`: "rank" (all entries of a row compared at once, O(t^2); for short rows and the interpreter) or
    "merge" (a tree of bitonic top-k levels over chunks of up to `chunk` keys; long rows on the GPU); None picks
    by the row length. Both give the same ids."""
    n = q.shape[0]
    t = entries.shape[0]
    out = torch.empty(n, k, dtype=torch.int64, device=q.device)
    if n == 0 or k == 0:
        return out
    assert t < 2**IDX_BITS, "indexer_topk: too many entries for the 31-bit key"
    scores = index_scores(q, entries, weights)
    tp = max(16, triton.next_power_of_2(max(t, k)))
    if method is None:
        # the GPU keeps a row's TP x TP comparisons in registers (16K per program at most); the interpreter pays
        # per op, not per element, and its bitonic merges are slow
        method = "rank" if tp <= (1024 if runtime.interpreting() else 128) else "merge"
    if method == "rank":
        br = max(1, min(triton.next_power_of_2(n), (1 << 20 if runtime.interpreting() else 1 << 13) // (tp * tp)))
        grid = (triton.cdiv(n, br),)
        _topk_rank_kernel[grid](scores, out, n, t, k, start_pos, ratio, TP=tp, BR=br, num_warps=8)
        return out
    kp = max(2, triton.next_power_of_2(k))  # tl.topk needs k >= 2
    # a tree of top-k levels: each (row, chunk of `c` keys) program keeps its chunk's top kp, so a long row's
    # chunks run in parallel and each level divides the candidates by c / kp (the keys are distinct: the top k is
    # the same set, in the same order, whatever the chunking)
    widest = max(2 * kp, triton.next_power_of_2(chunk or 4096))
    src, width, first = scores, t, True
    while True:
        c = min(widest, max(kp, triton.next_power_of_2(width)))
        n_chunks = triton.cdiv(width, c)
        final = n_chunks == 1
        dst = out if final else torch.empty(n, n_chunks * kp, dtype=torch.int64, device=q.device)
        _topk_tree_kernel[(n, n_chunks)](
            src, dst, t, width, k, start_pos, ratio, KP=kp, C=c, FROM_SCORES=first, FINAL=final,
            num_warps=4 if c <= 1024 else 8,
        )  # fmt: skip
        if final:
            return out
        src, width, first = dst, n_chunks * kp, False

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
2. top-k (programs per block of queries; per row, or per (row, chunk), for long rows): entry j is visible to query
   r iff j < (start_pos + r + 1) // ratio (a prefill is start_pos 0: j < (r + 1) // ratio; the same rule as the
   twin's -inf mask and its per-token decode rows). Each visible (score, j) becomes an int64 key, score order in the
   high 32 bits (+0 and -0 equal), ~j in the low bits. Short rows: each key's rank is counted directly. Long rows:
   a radix select, one program per row: four 8-bit histogram passes find the k-th largest score's 32-bit order,
   one more pass gathers the <= k keys above it and the lowest-id ones equal to it, and one bitonic sort of those
   orders them (rows of more than 8 chunks of 4096 keys in a launch of at most 512 chunks take a tree of levels
   instead, one program per (row, chunk) keeping the chunk's top KP with Triton's bitonic `tl.topk`: the chunks run
   in parallel). Output: the first k keys as entry ids in descending score order, -1 where a query sees fewer than
   k entries.

The ragged form (`indexer_topk_ragged`, the engine's call on one rank) serves a whole batch of sequences with the
same two steps, one scores launch and one top-k pass for all query rows: each row carries its sequence's (first
slot in the entry row table, entry count, k, position) in a `[T, 4]` meta table, and its scores kernel reads the
entries it sees straight from the flat paged pool through their row ids (no gathered copy of any sequence's
entries; one query row per program on the GPU, the heads as the MMA's M, as the per-request kernel at h 64). The
scores are the per-request kernel's bits (exact FP4-grid dot products; padded heads add zeros to the head sum), the
keys the same keys, so each row's ids are the per-request op's, ties included.

Ties: equal scores come out in ascending entry id (the key's low bits). torch.topk's order among equal values is
implementation-defined (CUDA gave descending ids on one row, spec §7.2 step 10; the CPU kernel differs by row
width): so the ids equal the twin's up to the order and choice among entries whose scores tie, which the tests
compare as sets modulo ties (`bitwise=False`).

Speed on the H200 (docs/perf-h200/triton_attention.md, 2026-12-03): a decode row of 16384 entries 0.09 ms (Flash,
k 512) / 0.15 ms (Pro, k 1024), 2.6x / 1.7x the torch backend (the single-program merge took 0.27 / 0.33 ms);
the scores and top-k of one row are latency bound (1 % of copy bandwidth), a 4k prefill is at ~40 %.
On the H100 (session 20, `bench/triton_attention.py --ops indexer_topk --quick`, graph ms, merge -> radix select):
a decode row of 16384 entries 0.098 -> 0.075 (Flash) / 0.159 -> 0.079 (Pro); a 4k prefill 0.819 -> 0.614 /
0.875 -> 0.748; the ragged op at 64 requests of <= 16k entries 0.105 -> 0.075 / 0.122 -> 0.084 (docs/perf.md).
"""

import functools

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime

IDX_BITS = 31  # low key bits: ~entry id (entries < 2^31)
# where `_topk` takes the merge tree over the radix select (H100, session 21, score rows alone, CUDA graph, k 512:
# docs/perf.md, twenty-first pass). The radix select runs one program a row, so its time follows the entries a row
# (16k 69 us, 32k 129, 64k 262, 128k 559) and not the rows while they fit the SMs (1, 4 and 16 rows of 64k: 262
# us each); the merge's chunk programs share the GPU (one row of 16k 94 us, 32k 126, 64k 140, 128k 156; 4 rows of
# 64k 140, 16 rows 196, 64 rows of 16k 151). The merge: rows of more than MERGE_MIN_CHUNKS chunks of 4096 keys
# (at 8, 32k entries, the two are within 3 %), while the whole launch has at most MERGE_MAX_CHUNKS chunks (the
# merge's time grows ~0.3 us a chunk past ~64: it meets the radix select's 262 us near 480 chunks of 64k rows;
# more than 16 rows of 64k entries was not measured)
MERGE_MIN_CHUNKS = 8
MERGE_MAX_CHUNKS = 512
CHUNK = 4096  # keys a program of the long-row kernels reads at a time (the radix select) or keeps (a tree chunk)


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
    dims = tl.arange(0, DP)
    q = _query_rows(q_ptr, rows, L, H, D, q_sl, q_sh, HP, DP)
    emask = ents < T
    e = tl.load(e_ptr + ents[:, None] * e_st + dims[None, :], mask=emask[:, None] & (dims < D)[None, :], other=0.0)
    s = tl.dot(tl.reshape(q, [BR * HP, DP]), tl.trans(e))  # [BR*HP, BT] fp32
    w = _head_weights(w_ptr, rows, L, H, w_sl, w_sh, HP)
    total = _weighted_head_sum(tl.reshape(s, [BR, HP, BT]), w, W_BF16)
    tl.store(out_ptr + rows[:, None] * T + ents[None, :], total, mask=(rows < L)[:, None] & emask[None, :])


@triton.jit
def _query_rows(q_ptr, rows, L, H, D, q_sl, q_sh, HP: tl.constexpr, DP: tl.constexpr):
    # query rows `rows` of q [L, H, D], padded to [BR, HP, DP] with zeros
    heads = tl.arange(0, HP)
    dims = tl.arange(0, DP)
    return tl.load(q_ptr + rows[:, None, None] * q_sl + heads[None, :, None] * q_sh + dims[None, None, :],
                   mask=(rows < L)[:, None, None] & (heads < H)[None, :, None] & (dims < D)[None, None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _head_weights(w_ptr, rows, L, H, w_sl, w_sh, HP: tl.constexpr):
    # the rows' head weights [BR, HP], zeros past the ends (loaded after the dot: fewer registers live across it)
    heads = tl.arange(0, HP)
    mask = (rows < L)[:, None] & (heads < H)[None, :]
    return tl.load(w_ptr + rows[:, None] * w_sl + heads[None, :] * w_sh, mask=mask, other=0.0)


@triton.jit
def _weighted_head_sum(s, w, W_BF16: tl.constexpr):
    # fp32 q . k [BR, HP, BT], weights [BR, HP] -> [BR, BT]: the twin's bf16 einsum output, relu, times the weights,
    # summed over heads (in bf16 steps when the weights are bf16)
    s = tl.maximum(s.to(tl.bfloat16), 0.0).to(tl.float32)
    prod = s * w.to(tl.float32)[:, :, None]
    if W_BF16:
        prod = prod.to(tl.bfloat16).to(tl.float32)  # the bf16 x bf16 product
        return tl.sum(prod, axis=1).to(tl.bfloat16).to(tl.float32)
    return tl.sum(prod, axis=1)


@triton.jit
def _order(scores):
    # fp32 score -> int64 in [0, 2^32), monotone in the float value (+0 and -0 equal, as in torch.topk)
    s = tl.where(scores == 0.0, 0.0, scores)
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, ~bits, bits + 2147483648)


@triton.jit
def _key(order, ents):
    # (score order, int64 entry) -> int64 key, larger = earlier in the output: the order above IDX_BITS of ~entry
    return (order << 31) | (2147483647 - ents)


@triton.jit
def _entry(key):
    # the entry id a key holds (`_key`'s low bits)
    return 2147483647 - (key & 2147483647)


@triton.jit
def _keys(scores, ents, visible):
    # (score, entry) -> int64 key; invisible -> -1
    return tl.where(visible, _key(_order(scores), ents), -1)


@triton.jit
def _row_limits(meta_ptr, rows, L, T, K, start_pos, ratio, RAGGED: tl.constexpr):
    # (entries a query row sees, its k) for rows (a block, or one row): one request derives them from the scalars
    # (row r at position start_pos + r, t = T entries, k = K); a ragged batch reads its row of meta (entry count,
    # k, position) since its rows belong to different sequences
    live = rows < L
    if RAGGED:
        n = tl.load(meta_ptr + rows * 4 + 1, mask=live, other=0)
        k = tl.load(meta_ptr + rows * 4 + 2, mask=live, other=0)
        vis = tl.minimum((tl.load(meta_ptr + rows * 4 + 3, mask=live, other=0) + 1) // ratio, n)
    else:
        vis = tl.minimum((start_pos + rows + 1) // ratio, T)
        k = K + 0 * rows
    return tl.where(live, vis, 0), k


# the ragged form: every query row scores its own sequence's entries, read through row ids into the flat pool
@triton.jit(do_not_specialize=["L", "E"])
def _ragged_scores_kernel(
    q_ptr, pool_ptr, rows_ptr, meta_ptr, w_ptr, out_ptr, L, H, E, D, ratio,
    q_sl, q_sh, p_st, w_sl, w_sh,
    HP: tl.constexpr, DP: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, W_BF16: tl.constexpr,
):  # fmt: skip
    # one program per block of BR query rows x BT entry slots; row r reads entry e of its sequence from pool row
    # rows_ptr[base_r + e], only the entries it can see (e < min((pos_r + 1) // ratio, n_r)); rows of one block may
    # belong to different sequences, so each row's entries are its own operand (a batched dot; one row per program
    # on the GPU, where the MMA's M is the heads)
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    ents = tl.program_id(1).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)
    dims = tl.arange(0, DP)
    base = tl.load(meta_ptr + rows * 4, mask=rows < L, other=0)
    vis, _ = _row_limits(meta_ptr, rows, L, E, 0, 0, ratio, True)
    emask = ents[None, :] < vis[:, None]  # [BR, BT]
    pool_row = tl.load(rows_ptr + base[:, None] + ents[None, :], mask=emask, other=0)  # [BR, BT]
    q = _query_rows(q_ptr, rows, L, H, D, q_sl, q_sh, HP, DP)
    # [BR, DP, BT]: each row's entries, transposed for the dot
    et = tl.load(pool_ptr + pool_row[:, None, :] * p_st + dims[None, :, None],
                 mask=emask[:, None, :] & (dims < D)[None, :, None], other=0.0)  # fmt: skip
    if BR == 1:
        s = tl.reshape(tl.dot(tl.reshape(q, [HP, DP]), tl.reshape(et, [DP, BT])), [1, HP, BT])  # fp32
    else:
        s = tl.dot(q, et)  # [BR, HP, BT] fp32
    w = _head_weights(w_ptr, rows, L, H, w_sl, w_sh, HP)
    tl.store(out_ptr + rows[:, None] * E + ents[None, :], _weighted_head_sum(s, w, W_BF16), mask=emask)


@triton.jit(do_not_specialize=["L", "T", "K", "start_pos"])
def _topk_rank_kernel(
    sc_ptr, meta_ptr, out_ptr, L, T, K, start_pos, ratio, TP: tl.constexpr, BR: tl.constexpr, RAGGED: tl.constexpr
):
    # all of a row's entries at once: each key's rank is the number of larger keys (keys are distinct: the entry id
    # is in them), and the entry goes to output column rank if rank < k. O(t^2) compares, no sorting network.
    # Scores are [L, T] (T: the widest row), the output [L, K] (K: the widest k).
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    vis, k = _row_limits(meta_ptr, rows, L, T, K, start_pos, ratio, RAGGED)
    ents = tl.arange(0, TP).to(tl.int64)
    visible = ents[None, :] < vis[:, None]
    sc = tl.load(sc_ptr + rows[:, None] * T + ents[None, :], mask=visible, other=0.0)
    keys = _keys(sc, ents[None, :], visible)  # [BR, TP]
    rank = tl.sum((keys[:, None, :] > keys[:, :, None]).to(tl.int32), axis=2)  # [BR, TP]
    tl.store(out_ptr + rows[:, None] * K + rank, ents[None, :], mask=visible & (rank < k[:, None]))
    # columns past the row's visible count or its own k (a ragged row narrower than the batch's K): none
    cols = tl.arange(0, TP)
    pad = (cols[None, :] >= tl.minimum(vis, k)[:, None]) & (cols < K)[None, :] & (rows < L)[:, None]
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], tl.full([BR, TP], -1, tl.int64), mask=pad)


@triton.jit(do_not_specialize=["T", "W", "K", "start_pos"])
def _topk_tree_kernel(
    src_ptr, meta_ptr, out_ptr, T, W, K, start_pos, ratio,
    KP: tl.constexpr, C: tl.constexpr, FROM_SCORES: tl.constexpr, FINAL: tl.constexpr, RAGGED: tl.constexpr,
):  # fmt: skip
    # one program per (query row, chunk of C keys): the chunk's top KP keys, sorted descending (Triton's bitonic
    # top-k). The first level makes the keys from a row's scores (width T), later ones read the previous level's
    # [rows, W] keys; the final level (one chunk left) writes entry ids, -1 past the row's own k
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    pos = chunk.to(tl.int64) * C + tl.arange(0, C).to(tl.int64)
    vis, k = _row_limits(meta_ptr, row, row + 1, T, K, start_pos, ratio, RAGGED)
    if FROM_SCORES:
        visible = pos < vis
        sc = tl.load(src_ptr + row * T + pos, mask=visible, other=0.0)
        keys = _keys(sc, pos, visible)
    else:
        keys = tl.load(src_ptr + row * W + pos, mask=pos < W, other=-1)
    best = tl.reshape(tl.topk(tl.reshape(keys, [1, C]), KP, dim=1), [KP])
    cols = tl.arange(0, KP)
    if FINAL:
        ids = tl.where((best >= 0) & (cols < k), _entry(best), -1)
        tl.store(out_ptr + row * K + cols, ids, mask=cols < K)
    else:
        tl.store(out_ptr + (row * tl.num_programs(1) + chunk) * KP + cols, best)


@triton.jit(do_not_specialize=["T", "K", "start_pos"])
def _topk_radix_kernel(
    sc_ptr, meta_ptr, tmp_ptr, out_ptr, T, K, start_pos, ratio, KP: tl.constexpr, C: tl.constexpr,
    RAGGED: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    # one program per query row, reading its scores in chunks of C: a radix select of the k-th largest score's
    # 32-bit order, 8 bits a pass from the top (a histogram of the next digit among the entries that share the
    # digits found so far), then one pass that gathers the entries above it and, of those equal to it, the ones
    # with the smallest ids (the keys' tie rule), in id order, into the row's KP scratch slots; then one bitonic sort
    # of those <= k keys. A row's scores are read 5 times, from L2 after the first (a 16k-entry row is 64 KiB).
    # PLANT (tests only): 1 = the last digit's pass skipped (entries that share the top 24 bits tie by id)
    row = tl.program_id(0).to(tl.int64)
    vis, k = _row_limits(meta_ptr, row, row + 1, T, K, start_pos, ratio, RAGGED)
    vis = vis.to(tl.int32)
    take = tl.minimum(vis, k.to(tl.int32))  # the ids this row outputs
    src = sc_ptr + row * T
    bins = tl.arange(0, 256)
    prefix = (vis * 0).to(tl.int64)  # the digits of the take-th largest order found so far
    need = take  # how many of the entries whose order starts with prefix are still to be taken
    if vis > take:  # else every visible entry is taken: prefix 0 and need = vis take them all below
        for p in tl.static_range(4):
            if p < 3 or PLANT != 1:
                hist = tl.zeros([256], tl.int32)
                for c0 in range(0, vis, C):
                    pos = c0 + tl.arange(0, C)
                    live = pos < vis
                    order = _order(tl.load(src + pos, mask=live, other=0.0))
                    if p > 0:
                        live = live & ((order >> (32 - 8 * p)) == prefix)
                    hist += tl.histogram(((order >> (24 - 8 * p)) & 255).to(tl.int32), 256, mask=live)
                suffix = tl.sum(hist) - tl.cumsum(hist, 0) + hist  # entries in this digit's bins >= b
                b = tl.sum((suffix >= need).to(tl.int32)) - 1  # the bin holding the need-th largest
                need -= tl.sum(tl.where(bins > b, hist, 0))
                prefix = prefix * 256 + b
            else:
                prefix = prefix * 256
    # prefix is now the take-th largest order; take every entry above it and the first `need` equal to it
    ties = vis * 0
    taken = vis * 0
    for c0 in range(0, vis, C):
        pos = c0 + tl.arange(0, C)
        live = pos < vis
        order = _order(tl.load(src + pos, mask=live, other=0.0))
        tie = live & (order == prefix)
        pick = (live & (order > prefix)) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= need))
        slot = taken + tl.cumsum(pick.to(tl.int32), 0) - 1
        keys = _key(order, pos.to(tl.int64))
        tl.store(tmp_ptr + row * KP + slot, keys, mask=pick & (slot < take))  # (< take: a bound, not a rule)
        ties += tl.sum(tie.to(tl.int32))
        taken += tl.sum(pick.to(tl.int32))
    tl.debug_barrier()  # the scratch slots written above by other threads of this program
    cols = tl.arange(0, KP)
    best = tl.sort(tl.load(tmp_ptr + row * KP + cols, mask=cols < take, other=-1), descending=True)
    ids = tl.where(cols < take, _entry(best), -1)
    tl.store(out_ptr + row * K + cols, ids, mask=cols < K)


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
    hp, dp = runtime.next_pow2(h), max(16, runtime.next_pow2(d))
    if runtime.interpreting():
        br = min(runtime.next_pow2(n), max(1, 256 // hp))
        bt = min(max(16, runtime.next_pow2(t)), 256)
    else:
        br = max(1, 64 // hp) if hp < 64 else 1  # at least 64 MMA rows per program
        bt = 64
    grid = (runtime.cdiv(n, br), runtime.cdiv(t, bt))
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

    `method`: "rank" (all entries of a row compared at once, O(t^2); for short rows and the interpreter), "radix"
    (a radix select over chunks of up to `chunk` scores; long rows) or "merge" (a tree of bitonic top-k levels over
    chunks of up to `chunk` keys; few long rows); None picks by the rows' length and count. All give the same ids."""
    n = q.shape[0]
    t = entries.shape[0]
    out = torch.empty(n, k, dtype=torch.int64, device=q.device)
    if n == 0 or k == 0:
        return out
    assert t < 2**IDX_BITS, "indexer_topk: too many entries for the 31-bit key"
    scores = index_scores(q, entries, weights)
    return _topk(scores, out, start_pos, ratio, None, method, chunk)


def _ragged_meta(q, cu_seqlens, cu_entries, k, start_pos) -> torch.Tensor:
    """`[T, 4]` int64 on q's device, per query row: (its sequence's first slot in entry_rows, entry count, k,
    position); built on the host and copied once per batch: every CSA layer of a forward passes the same sizes, so
    the table is cached on them (a function of its arguments alone; the kernels only read it)."""
    return _meta_table(*(tuple(v) for v in (cu_seqlens, cu_entries, k, start_pos)), q.device)


@functools.lru_cache(maxsize=8)
def _meta_table(cu_seqlens, cu_entries, k, start_pos, device) -> torch.Tensor:
    # host ints, not small CPU tensor ops (see parity.optimized.batch)
    rows = [
        (cu_entries[i], cu_entries[i + 1] - cu_entries[i], k[i], start_pos[i] + j)
        for i in range(len(cu_seqlens) - 1)
        for j in range(cu_seqlens[i + 1] - cu_seqlens[i])
    ]
    return torch.tensor(rows, dtype=torch.int64).view(-1, 4).to(device, non_blocking=True)


def index_scores_ragged(q, pool, entry_rows, weights, meta, width: int, ratio: int) -> torch.Tensor:
    """`[T, width]` fp32 scores of a ragged batch (`indexer_topk_ragged`; `meta` from `_ragged_meta`): row r's
    columns 0..v_r-1 are the twin's scores against the entries it sees, the other columns are not written."""
    n, h, d = q.shape
    out = torch.empty(n, width, dtype=torch.float32, device=q.device)
    if n == 0 or width == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    assert pool.stride(1) == 1, "indexer_topk_ragged: pool rows must be contiguous"
    hp, dp = max(16, runtime.next_pow2(h)), max(16, runtime.next_pow2(d))  # dot operands >= 16
    if runtime.interpreting():  # few, wide programs (the interpreter pays per program and per op)
        bt = min(max(16, runtime.next_pow2(width)), 256)
        br = min(runtime.next_pow2(n), max(1, 4096 // bt))
    else:
        br, bt = 1, 64  # M = the heads (64 in Flash and Pro), as the per-request kernel at h 64
    grid = (runtime.cdiv(n, br), runtime.cdiv(width, bt))
    _ragged_scores_kernel[grid](
        q, pool, entry_rows, meta, weights, out, n, h, width, d, ratio,
        q.stride(0), q.stride(1), pool.stride(0), weights.stride(0), weights.stride(1),
        HP=hp, DP=dp, BR=br, BT=bt, W_BF16=weights.dtype == torch.bfloat16,
    )  # fmt: skip
    return out


def indexer_topk_ragged(
    q, pool, entry_rows, weights, cu_seqlens, cu_entries, k, start_pos, ratio: int, method: str | None = None,
    chunk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """The `IndexerTopkRagged` contract: a batch of sequences in one scores launch and one top-k pass. q bf16
    `[T, h, d]`, pool bf16 `[P, d]` (the flat entry pool), entry_rows int64: sequence i's entry e is pool row
    `entry_rows[cu_entries[i] + e]`, weights `[T, h]`, host ints cu_seqlens `[N+1]`, cu_entries `[N+1]`, k `[N]`,
    start_pos `[N]` -> `[T, max k]` int64: each sequence's rows as `indexer_topk` gives them, -1 past its own k."""
    n = q.shape[0]
    kmax = max(k, default=0)
    out = torch.empty(n, kmax, dtype=torch.int64, device=q.device)
    if n == 0 or kmax == 0:
        return out
    width = max(b - a for a, b in zip(cu_entries[:-1], cu_entries[1:]))
    assert width < 2**IDX_BITS, "indexer_topk_ragged: too many entries for the 31-bit key"
    meta = _ragged_meta(q, cu_seqlens, cu_entries, k, start_pos)
    scores = index_scores_ragged(q, pool, entry_rows, weights, meta, width, ratio)
    return _topk(scores, out, 0, ratio, meta, method, chunk)


def _method(n: int, t: int, tp: int) -> str:
    """The top-k kernel for n rows of t entries (padded to tp). The GPU keeps a row's tp x tp comparisons in
    registers (16K per program at most); the interpreter pays per op, not per element, and its bitonic merges are
    slow. Long rows: the radix select, but for rows of many CHUNK-key chunks in a launch of few chunks in all, where
    the merge's chunk programs spread over the GPU (MERGE_MIN_CHUNKS, MERGE_MAX_CHUNKS)."""
    if tp <= (1024 if runtime.interpreting() else 128):
        return "rank"
    chunks = runtime.cdiv(t, CHUNK)
    return "merge" if chunks > MERGE_MIN_CHUNKS and n * chunks <= MERGE_MAX_CHUNKS else "radix"


def _topk(scores, out, start_pos, ratio, meta, method, chunk, plant: int = 0) -> torch.Tensor:
    # scores [L, t] -> out [L, K]: one request (meta None: row r at start_pos + r, k = K) or a ragged batch (per-row
    # entry count, k and position in meta)
    (n, t), k = scores.shape, out.shape[1]
    ragged = meta is not None
    meta = meta if ragged else out  # an unread pointer of the right type
    tp = max(16, runtime.next_pow2(max(t, k)))
    if method is None:
        method = _method(n, t, tp)
    if method == "rank":
        br = max(1, min(runtime.next_pow2(n), (1 << 20 if runtime.interpreting() else 1 << 13) // (tp * tp)))
        grid = (runtime.cdiv(n, br),)
        _topk_rank_kernel[grid](scores, meta, out, n, t, k, start_pos, ratio, TP=tp, BR=br, RAGGED=ragged, num_warps=8)
        return out
    kp = max(2, runtime.next_pow2(k))  # tl.topk needs k >= 2
    if method == "radix":
        c = min(max(16, runtime.next_pow2(t)), runtime.next_pow2(chunk or CHUNK))
        tmp = torch.empty(n, kp, dtype=torch.int64, device=scores.device)
        _topk_radix_kernel[(n,)](scores, meta, tmp, out, t, k, start_pos, ratio, KP=kp, C=c, RAGGED=ragged,
                                 PLANT=plant, num_warps=8)  # fmt: skip
        return out
    # a tree of top-k levels: each (row, chunk of `c` keys) program keeps its chunk's top kp, so a long row's
    # chunks run in parallel and each level divides the candidates by c / kp (the keys are distinct: the top k is
    # the same set, in the same order, whatever the chunking)
    widest = max(2 * kp, runtime.next_pow2(chunk or CHUNK))
    src, width, first = scores, t, True
    while True:
        c = min(widest, max(kp, runtime.next_pow2(width)))
        n_chunks = runtime.cdiv(width, c)
        final = n_chunks == 1
        dst = out if final else torch.empty(n, n_chunks * kp, dtype=torch.int64, device=scores.device)
        _topk_tree_kernel[(n, n_chunks)](
            src, meta, dst, t, width, k, start_pos, ratio, KP=kp, C=c, FROM_SCORES=first, FINAL=final,
            RAGGED=ragged, num_warps=4 if c <= 1024 else 8,
        )  # fmt: skip
        if final:
            return out
        src, width, first = dst, n_chunks * kp, False

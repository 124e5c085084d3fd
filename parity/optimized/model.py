"""DeepSeek-V4 over flat ragged token batches with paged KV and per-request state: the implementation that parity
checks against the reference.

Same module tree and parameter names as `parity.reference.model` (the modules subclass the reference ones for their
parameters, so the same checkpoints and state dicts load into both; the reference constructors build the optimized
sub-modules, named by their `*_class` attributes, so each is built once), different execution:
- activations are `[T, ...]` for all sequences of a step (`Batch`), not `[b, s, ...]` with one start_pos;
- window KV in a per-request ring, compressed entries in paged blocks, compressor state in per-request slots
  (`PagedCache`), all passed explicitly: the reference's own caches are never allocated (that is its
  `Transformer.setup_caches`), and the compressor runs the reference's state machine on the request's state rows;
- a sequence's step may be a prefill (start_pos 0), a decode (one token), or a chunk of several tokens after a
  context (chunked prefill, MTP verification), which the official model cannot run;
- every compute op goes through the op registry (`ops.<name>`), so one op at a time can be switched to a backend;
- taps (`parity.taps.Tap`) mark the points a harness reads and teacher-forces: each block's input streams, the
  mHC mixes in and out, the attention and MoE inputs and outputs, compressor entries, indexer top-k, the routing,
  the logits. The reference gets the same taps attached from outside (`parity.capture.reference`).

Numerics, per sequence: a start_pos-0 step follows the reference prefill and a one-token step the reference
decode op for op (bitwise equal with the torch backend); a chunk after a context runs the compressor state machine
token by token like the decode path and gives each token a 128-wide window list like a decode.

Per-request bookkeeping runs for all requests of a step at once, on the tokens' device, with no host round trip:
the attention index lists (`OptAttention._sparse_idx`), the ring writes, the compressor state machine after a
context and the norm / RoPE / fake-quant of new entries (`compress_all`), the indexer top-k on one rank
(`ops.indexer_topk_ragged`, reading each request's entries from the pool by row ids). Its index tensors are
derived from the batch's host metadata once per forward (`Batch.derived`) and shared by the layers. Each request's
values are the ones it gets alone: the ops whose torch form is shape-sensitive get the requests' row groups
(`segments`).
"""

import itertools
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from parity.config import ModelArgs
from parity.optimized import parallel
from parity.optimized.batch import Batch, host_ints
from parity.optimized.cache import CompressorState, PagedCache
from parity.optimized.graphs import DecodeGraphs
from parity.optimized.ops import resolve_ops
from parity.optimized.ops.indexer_topk_ragged import pad_cat
from parity.optimized.ops.moe_experts import ExpertWeights
from parity.optimized.parallel import ONE_RANK, TP
from parity.reference import model as ref
from parity.taps import Tap

KV_QUANT_BLOCK = ref.KV_QUANT_BLOCK


def run_linear(ops, lin: ref.Linear, x: torch.Tensor) -> torch.Tensor:
    """A reference `Linear`'s weights applied through the selected ops (quantized GEMMs are row-independent)."""
    if lin.weight.dtype == torch.float4_e2m1fn_x2:
        xq, s = ops.act_quant(x, ref.BLOCK_SIZE, lin.scale_fmt, lin.scale_dtype)
        return ops.fp4_gemm(xq, s, lin.weight, lin.scale, lin.scale_dtype)
    if lin.weight.dtype == torch.float8_e4m3fn:
        xq, s = ops.act_quant(x, ref.BLOCK_SIZE, lin.scale_fmt, lin.scale_dtype)
        return ops.fp8_gemm(xq, s, lin.weight, lin.scale, lin.scale_dtype)
    return F.linear(x, lin.weight)


def _window_idx(positions: torch.Tensor, window: int) -> torch.Tensor:
    """positions [T] -> [T, window] absolute positions each query reads from the window, -1 = none: the reference
    decode order (oldest to newest, -1 padding at the end). A query's list depends on its position alone; a
    prefill's list (the reference prefill: min(n, window) columns) is the first min(n, window) columns of its
    queries' lists (the rest is -1 there: a prefill query at t < window sees 0..t)."""
    t = positions.unsqueeze(1)  # [T, 1]
    u = (t - window + 1).clamp(min=0) + torch.arange(window, device=t.device)  # [T, window]
    return torch.where(u > t, -1, u)


class OptCompressor(ref.Compressor):
    """Compressor over the batch's tokens with the requests' state rows passed in (reference: ref.Compressor); the
    driver is `compress_all`."""

    def __init__(self, args: ModelArgs, compress_ratio: int, head_dim: int, rotate: bool = False, *, ops):
        super().__init__(args, compress_ratio, head_dim, rotate)
        self.ops = ops
        self.kv_fp8 = args.kv_fp8_sim
        self.entries = Tap()  # (new entries [m, d], token rows [m] of the tokens that completed them)

    def project(self, x, segments):
        """x: [T, D] -> (kv, score) [T, coff*d] fp32: the wkv and wgate projections of every token of the batch in
        one call each (`segments`: the batch's op segments, so each request's rows run as they would alone; one
        launch each where a call per request made a decode step of 64 requests 385 dense_linear calls, 31 % of its
        time on the H200: docs/perf.md)."""
        xf = x.float()
        kv = self.ops.dense_linear(xf, self.wkv.weight, segments)
        return kv, self.ops.dense_linear(xf, self.wgate.weight, segments)

    def prefill(self, kv, score, state: CompressorState, slot: int):
        """kv, score: [n, coff*d] projections of one request's prompt (start_pos 0) -> its entries 0..m-1 pooled,
        [m, d] fp32, or None (n < ratio); the partial tail goes into the request's state rows."""
        kv_state, score_state = state.rows(slot)  # [1, coff*r, coff*d]
        blocks = self.prefill_blocks(kv[None], score[None], kv_state, score_state)  # [1, m, w, d] each
        return self.ops.compress_pool(*blocks)[0] if kv.shape[0] >= self.compress_ratio else None

    def decode_step(self, kv, score, step: "_DecodeStep", state: CompressorState):
        """The reference `decode_block` for one token of each of D requests at once, each at its own position and
        in its own state slot (`step`), one `compress_state` call. kv, score: [T, coff*d] projections of the batch
        -> the blocks these tokens complete, (kv, score) [M, w, d] each, or None."""
        return self.ops.compress_state(
            kv, score, self.ape, step.rows, step.phase, step.slots, step.done_slots, state.kv, state.score, self.overlap
        )

    def decode(self, kv, score, step: "_DecodeStep", state: CompressorState, freqs_cis, plan: "_CompressPlan", pool):
        """A decode step (one token per request after its context): `decode_step`, the pooling of the blocks its
        tokens complete and `finish`, their entries written to pool rows `plan.pool_rows` of the flat `pool`, one
        `compress_decode` call -> the entries [M, d] bf16 in request order, or None."""
        return self.ops.compress_decode(
            kv, score, self.ape, step.rows, step.phase, step.slots, step.done_slots, state.kv, state.score,
            self.overlap, self.norm.weight, self.norm.eps, freqs_cis, plan.positions, self.rotate, self.scale_fmt,
            self.scale_dtype, self.kv_fp8, pool, plan.pool_rows,
        )  # fmt: skip

    def finish(self, pooled, segments: tuple[int, ...], freqs_cis, positions):
        """pooled: [m, d] fp32 new entries of any requests -> the bf16 entries (the activations' dtype): norm, RoPE
        (`positions` [m]: each entry's row of the `freqs_cis` table), fake-quant, one `compress_finish` call.
        `segments`: the norm's row groups (the reference normalizes a prefill's entries together and a decode's entry
        alone); the other stages are row-independent."""
        return self.ops.compress_finish(
            pooled, self.norm.weight, self.norm.eps, segments, freqs_cis, positions, self.rotate, self.scale_fmt,
            self.scale_dtype, self.kv_fp8,
        )  # fmt: skip


class OptIndexer(ref.Indexer):
    """CSA indexer over ragged tokens and paged 128-d entries (reference: ref.Indexer)."""

    def __init__(self, args: ModelArgs, compress_ratio: int, ops, tp: TP = ONE_RANK):
        self.compressor_class = partial(OptCompressor, ops=ops)  # what the reference constructor builds
        super().__init__(args, compress_ratio)
        self.ops = ops
        self.tp = tp
        self.n_local_heads = tp.local(self.n_heads, "index_n_heads")  # the weight scale keeps the global count
        self.topk = Tap()  # entry ids [T, k] (-1 = none), k = the widest of the batch

    def queries(self, x, qr, freqs, segments) -> "IndexerIn":
        """x: [T, D], qr: [T, q_lora_rank] -> the step's per-token inputs of the top-k: the queries, their head
        weights and the compressor's projections (functions of the tokens alone)."""
        ops = self.ops
        q = run_linear(ops, self.wq_b, qr).unflatten(-1, (self.n_local_heads, self.head_dim))  # [T, h, d]
        ops.rope(q[..., -self.rope_head_dim :], freqs)
        q = ops.hadamard(q, q.size(-1) ** -0.5)
        ops.fp4_fake_quant(q, ref.FP4_BLOCK_SIZE)
        weights = ops.dense_linear(x, self.weights_proj.weight, segments)
        weights = weights * (self.softmax_scale * self.n_heads**-0.5)  # [T, h]
        return IndexerIn(q, weights, *self.compressor.project(x, segments))

    def select(self, inputs: "IndexerIn", batch: Batch, cache: PagedCache, layer: int, freqs_cis):
        """-> [T, k] top-k entry ids (-1 = none; k: the widest of the batch, each sequence's own k_i = min(index_topk,
        its entries) columns then -1), after this step's new entries are pooled into the request's pages."""
        ops, ratio = self.ops, self.compress_ratio
        q, weights = inputs.q, inputs.weights
        pool = cache.index_entries[layer]
        flat_pool = pool.view(-1, pool.shape[-1])
        state = cache.index_state[layer]
        compress_all(self.compressor, inputs.kv, inputs.score, batch, state, freqs_cis, flat_pool, cache, ratio)
        # the pool rows of every request's entries 0..n_i-1, request after request (built once per batch: per
        # request, a host index made each gather wait for the device)
        gather, _, counts, cu_entries = batch.derived(("entries", ratio), lambda: _entry_gather(batch, cache, ratio))
        ks = tuple(min(self.index_topk, c) for c in counts)
        if self.tp.world == 1:
            # the whole batch in one call, reading the pool through the row ids (one launch per layer, where a call
            # per request was the step's largest op)
            out = ops.indexer_topk_ragged(
                q, flat_pool, gather, weights, batch.cu_seqlens, cu_entries, ks, batch.start_pos, ratio
            )
        else:
            # tensor parallel: per request, the ranks' head sums are all-reduced before the top-k
            entries = flat_pool[gather].split(counts)  # [n_i, d] each
            parts = []
            for i in range(batch.num_seqs):
                rows, start = batch.rows(i), batch.start_pos[i]
                parts.append(parallel.indexer_topk(q[rows], entries[i], weights[rows], ks[i], start, ratio, self.tp))
            out = pad_cat(parts, max(ks))
        ids = self.topk(out)  # [T, max k]
        if ids is out:
            return ids
        # ids a hook put in their place (teacher forcing): -1 past each sequence's own k, as the op's own are (the
        # mask is the same in every CSA layer of the batch)
        width = ids.shape[1]
        past_k = batch.derived(
            ("past k", ks, width),
            lambda: torch.arange(width, device=ids.device) >= batch.to_device(batch.spread(ks))[:, None],
        )
        return torch.where(past_k, -1, ids)


class IndexerIn(NamedTuple):
    """The indexer's per-token inputs of one step (`OptIndexer.queries`)."""

    q: torch.Tensor  # [T, h, d] rotated, Hadamard-transformed, FP4-simulated queries
    weights: torch.Tensor  # [T, h] head weights, softmax and head-count scales applied
    kv: torch.Tensor  # [T, coff*d] fp32: its compressor's projections
    score: torch.Tensor


class _Entries(NamedTuple):
    """Every request's entries 0..n_i-1, request after request (`_entry_gather`)."""

    rows: torch.Tensor  # [sum n_i] flat pool rows
    seq: torch.Tensor  # [sum n_i] the request each belongs to
    counts: list[int]  # n_i: the entries its context has completed
    cu: tuple[int, ...]  # [N+1] where each request's entries start in `rows`, then their total


def _entry_gather(batch: Batch, cache: PagedCache, ratio: int) -> _Entries:
    counts = [c // ratio for c in batch.context_lens]
    cu = tuple(itertools.accumulate(counts, initial=0))
    # built on the device from one copy of the counts (the index is as long as all the contexts' entries)
    counts_d, first = batch.to_device([counts, cu[:-1]])
    total, dev = cu[-1], counts_d.device
    seq = torch.repeat_interleave(torch.arange(batch.num_seqs, device=dev), counts_d, output_size=total)  # [sum n_i]
    ids = torch.arange(total, device=dev) - first[seq]  # 0..n_i-1 per request
    return _Entries(cache.entry_rows_of(batch.device_tables[ratio], seq, ids), seq, counts, cu)


def _entry_lookup(batch: Batch, cache: PagedCache, ratio: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut, first): per request a -1 then its entries' pool rows + `offset` ([sum n_i + N]), and each token's
    place of its request's entry 0 in it ([T]): a token's entry id e (-1 = none) is `lut[first + e]`, one gather
    whatever the sign of e (a masked lookup took five launches per CSA layer)."""
    e = batch.derived(("entries", ratio), lambda: _entry_gather(batch, cache, ratio))
    total = e.rows.shape[0]
    lut = e.rows.new_full((total + batch.num_seqs,), -1)
    lut[torch.arange(total, device=lut.device) + e.seq + 1] = e.rows + offset
    first = [c + i + 1 for i, c in enumerate(e.cu[:-1])]
    return lut, batch.to_device(batch.spread(first))


@dataclass(frozen=True)
class _DecodeStep:
    """One token of each of D requests after a context (device tensors): `OptCompressor.decode_step`, `decode`."""

    rows: torch.Tensor | None  # [D] token rows; None: all T rows in order
    phase: torch.Tensor  # [D] position % ratio: the ape row and the block row
    slots: torch.Tensor  # [D] state slots
    done_slots: torch.Tensor | None  # [M] slots of those whose token completes a block (None: none does)


@dataclass(frozen=True)
class _CompressPlan:
    """Where a step's compressor work goes, the same for every layer of one ratio (built once per batch)."""

    prefill: list[tuple[int, int]]  # (sequence, slot) of the requests at start_pos 0: pooled one by one
    steps: list[_DecodeStep]  # the tokens after a context, token offset j = 0, 1, ...: one step each
    # the new entries: pooled rows come prefills first, then the steps' blocks; `order` (None: already) puts them in
    # request order, ascending ids, as the entries tap and the norm segments expect
    order: torch.Tensor | None  # [M]
    segments: tuple[int, ...]  # norm row groups: a prefill's entries together, every other entry alone
    positions: torch.Tensor  # [M] RoPE position of each entry: the first token of its block
    token_rows: torch.Tensor  # [M] row of the token that completed it
    pool_rows: torch.Tensor  # [M] flat pool row it goes to


def _compress_plan(batch: Batch, cache: PagedCache, ratio: int) -> _CompressPlan:
    """Host bookkeeping of the compressor state machine for every request of the batch (ints only; the tensors are
    copied to the device once). A prefill (start_pos 0) pools its blocks as one call, like the reference prefill;
    after a context the state machine runs token by token like the reference decode, for all requests at once."""
    n_seqs, cu, start = batch.num_seqs, batch.cu_seqlens, batch.start_pos
    prefill = [(i, batch.slots[i]) for i in range(n_seqs) if start[i] == 0]
    lens = batch.seq_lens
    made = [(i, e) for i, _ in prefill for e in range(lens[i] // ratio)]  # (sequence, entry id) as pooled
    after = [i for i in range(n_seqs) if start[i] > 0]
    host: list[list[int]] = []  # every index list of the plan, copied to the device in one copy

    def put(values: list[int]) -> int:
        host.append(values)
        return len(host) - 1

    steps = []  # per token offset: list numbers of (rows or None, phase, slots, done slots or None)
    for j in range(max((lens[i] for i in after), default=0)):
        seqs = [i for i in after if lens[i] > j]
        pos = [start[i] + j for i in seqs]
        done = [(i, p) for i, p in zip(seqs, pos) if (p + 1) % ratio == 0]
        made += [(i, p // ratio) for i, p in done]
        rows = [cu[i] + j for i in seqs]
        steps.append((
            None if rows == list(range(len(batch.seq_of_token))) else put(rows),
            put([p % ratio for p in pos]),
            put([batch.slots[i] for i in seqs]),
            put([batch.slots[i] for i, _ in done]) if done else None,
        ))  # fmt: skip
    order = sorted(range(len(made)), key=made.__getitem__)
    made = [made[k] for k in order]
    group = [(i, -1) if start[i] == 0 else (i, e) for i, e in made]  # a prefill's entries form one group
    n_order = None if order == list(range(len(order))) else put(order)
    n_pos = put([e * ratio for _, e in made])
    n_rows = put([cu[i] - start[i] + (e + 1) * ratio - 1 for i, e in made])
    # the new entries' pool rows, from the block tables on the host (a few small CPU ops; on the device they were a
    # launch each, and the gather of every request's entries they read from a dozen more)
    host_tables = batch.host.block_tables[ratio]  # int32: only the rows read are widened (`entry_rows`)
    seqs, ids = host_ints([[i for i, _ in made], [e for _, e in made]])
    n_pool = put(cache.entry_rows_of(host_tables, seqs, ids).tolist())
    dev = batch.to_device_many(host)
    return _CompressPlan(
        prefill=prefill,
        steps=[_DecodeStep(*(None if k is None else dev[k] for k in step)) for step in steps],
        order=None if n_order is None else dev[n_order],
        segments=(0, *(k for k in range(1, len(made)) if group[k] != group[k - 1]), len(made)),
        positions=dev[n_pos],
        token_rows=dev[n_rows],
        pool_rows=dev[n_pool],
    )


def compress_all(
    compressor, kv, score, batch: Batch, state, freqs_cis, flat_pool, cache: PagedCache, ratio: int
) -> None:
    """Run the compressor of every sequence (each its own state rows) on this step's projections (`kv`, `score`:
    [T, coff*d] fp32, `OptCompressor.project` of all requests at once), pass the new entries through the
    compressor's `entries` tap (token rows of the tokens that completed them), write them to the paged pool.

    A decode step (one token per request after its context) is one `compress_decode` call, which also writes the
    entries. Other batches: one call per op for the whole batch where the reference's per-request call is
    row-independent or takes segments: the pooling of the blocks completed after a context, the norm, RoPE and
    fake-quant of all new entries. A prefill's state update and pooling stay per request (one call per prompt:
    the reference pools its [1, m, w, d] blocks as one tensor)."""
    plan = batch.derived(("compress", ratio), lambda: _compress_plan(batch, cache, ratio))
    if not plan.prefill and len(plan.steps) == 1:  # a decode step: the whole compressor in one call
        entries = compressor.decode(kv, score, plan.steps[0], state, freqs_cis, plan, flat_pool)
        if entries is not None:
            tapped, _ = compressor.entries(entries, plan.token_rows)
            if tapped is not entries:  # replaced by a hook (teacher forcing): the pool holds what the tap gives
                flat_pool[plan.pool_rows] = tapped
        return
    pooled = [compressor.prefill(kv[batch.rows(i)], score[batch.rows(i)], state, slot) for i, slot in plan.prefill]
    blocks = [b for b in (compressor.decode_step(kv, score, step, state) for step in plan.steps) if b is not None]
    if blocks:
        parts = (part[0] if len(part) == 1 else torch.cat(part) for part in zip(*blocks))  # a decode: one step
        pooled.append(compressor.ops.compress_pool(*parts))  # [M, d]
    pooled = [p for p in pooled if p is not None]
    if not pooled:
        return
    pooled = torch.cat(pooled) if len(pooled) > 1 else pooled[0]  # [M, d] fp32
    if plan.order is not None:
        pooled = pooled[plan.order]
    entries = compressor.finish(pooled, plan.segments, freqs_cis, plan.positions)
    entries, _ = compressor.entries(entries, plan.token_rows)
    flat_pool[plan.pool_rows] = entries


class AttnIn(NamedTuple):
    """The attention's per-token work of one step (`OptAttention.tokens_in`)."""

    x: torch.Tensor  # [T, D] the attention input
    q: torch.Tensor  # [T, h, d] normed, rotated queries
    kv: torch.Tensor  # [T, d] this step's window KV, rotated and fake-quantized
    freqs: torch.Tensor  # [T, rd/2] complex RoPE factors at the tokens' positions
    index: IndexerIn | None  # the indexer's inputs (CSA layers)
    comp: tuple[torch.Tensor, torch.Tensor] | None  # the compressor's (kv, score) projections (compressed layers)


class OptAttention(ref.Attention):
    """Sliding window + compressed-entry sparse attention over ragged tokens (reference: ref.Attention)."""

    def __init__(self, layer_id: int, args: ModelArgs, ops, tp: TP = ONE_RANK):
        # the compressor and indexer the reference constructor builds (where the layer has them)
        self.compressor_class = partial(OptCompressor, ops=ops)
        self.indexer_class = partial(OptIndexer, ops=ops, tp=tp)
        super().__init__(layer_id, args)
        self.ops = ops
        self.tp = tp
        # this rank's query heads and output groups (all of them on one rank)
        self.n_local_heads = tp.local(self.n_heads, "n_heads")
        self.n_local_groups = tp.local(self.n_groups, "o_groups")
        self.kv_fp8 = args.kv_fp8_sim
        # qr: the q-LoRA latent (wq_b's and the indexer's input); q: the query the attention core reads; kv: the
        # window KV before RoPE and FP8 fake-quant; o_lora: wo_b's input. Forcing them keeps an FP8 code flipped by a
        # last-bit difference upstream (or a last-bit q amplified by large attention logits) out of the next
        # segment's own error
        self.input, self.qr, self.q, self.kv, self.o_lora, self.output = (Tap() for _ in range(6))
        # under TP a rank holds its heads of q and its groups of o_lora; the others are the same on every rank
        parallel.declare(self.q, "cat:1")
        parallel.declare(self.o_lora, "cat:1")

    def forward(self, x: torch.Tensor, batch: Batch, cache: PagedCache) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        a = self.tokens_in(x, batch.positions, batch.segments)
        return self.tokens_out(self.requests(a, batch, cache), a.freqs, batch.segments)

    # three phases: `tokens_in` and `tokens_out` are functions of the step's tokens alone (their values, positions
    # and the op segments), the same work whatever the requests' contexts; `requests` is the per-request work
    # between them (compressor state, indexer top-k, index lists, the attention core, the ring write), whose shapes
    # follow the contexts. Decode steps can replay the first two from graphs (`parity.optimized.graphs`)

    def tokens_in(self, x: torch.Tensor, positions: torch.Tensor, seg: tuple[int, ...]) -> "AttnIn":
        """x: [T, D], positions: [T] -> the projections, norms, RoPE and fake-quant of the queries and the window KV,
        the indexer's queries and the compressors' projections."""
        x = self.input(x)
        ops, rd = self.ops, self.rope_head_dim
        freqs = self.freqs_cis[positions]  # [T, rd/2]
        qr = q = self.qr(ops.rms_norm(run_linear(ops, self.wq_a, x), self.q_norm.weight, self.eps, seg))
        q = run_linear(ops, self.wq_b, q).unflatten(-1, (self.n_local_heads, self.head_dim))  # [T, h, d]
        ops.head_norm(q, self.eps, seg)
        ops.rope(q[..., -rd:], freqs)
        q = self.q(q)
        kv = self.kv(ops.rms_norm(run_linear(ops, self.wkv, x), self.kv_norm.weight, self.eps, seg))  # [T, d]
        ops.rope(kv[..., -rd:], freqs)
        ops.kv_fake_quant(kv[..., :-rd], KV_QUANT_BLOCK, self.scale_fmt, self.scale_dtype, self.kv_fp8)
        index = self.indexer.queries(x, qr, freqs, seg) if self.indexer else None
        comp = self.compressor.project(x, seg) if self.compress_ratio else None
        return AttnIn(x, q, kv, freqs, index, comp)

    def requests(self, a: "AttnIn", batch: Batch, cache: PagedCache) -> torch.Tensor:
        """-> o [T, h, d]: new entries pooled into the requests' pages, the indexer's top-k, every query's index
        list, the sparse attention over this step's KV, the rings and the pool, then this step's KV into the rings."""
        ops, layer, ratio = self.ops, self.layer_id, self.compress_ratio
        index_topk = None
        if self.indexer:
            index_topk = self.indexer.select(a.index, batch, cache, layer, self.freqs_cis)
        ring = cache.window[layer]  # [slots, win, d]
        pool = cache.entries[layer]
        if ratio:
            flat_pool = pool.view(-1, self.head_dim)
            kv, score, state = *a.comp, cache.state[layer]
            compress_all(self.compressor, kv, score, batch, state, self.freqs_cis, flat_pool, cache, ratio)
        idx = self._sparse_idx(batch, cache, index_topk, ring.shape[0] * self.window_size)  # [T, K]
        o = ops.sparse_attn(
            a.q,
            (a.kv, ring.view(-1, self.head_dim), pool.view(-1, self.head_dim) if ratio else a.kv[:0]),
            idx,
            self.attn_sink,
            self.softmax_scale,
        )
        self._write_ring(a.kv, batch, cache, ring)
        return o

    def tokens_out(self, o: torch.Tensor, freqs: torch.Tensor, seg: tuple[int, ...]) -> torch.Tensor:
        """o: [T, h, d] -> [T, D]: inverse RoPE, the grouped wo_a and wo_b."""
        ops = self.ops
        ops.rope(o[..., -self.rope_head_dim :], freqs, True)
        o = ops.o_lora(o.flatten(1), self.wo_a.weight, self.n_local_groups, self.o_lora_rank, seg)  # [T, g, rank]
        # wo_b is row-parallel: the ranks' partial outputs are all-reduced (nothing to do on one rank)
        return self.output(parallel.row_parallel(run_linear(ops, self.wo_b, self.o_lora(o.flatten(1))), self.tp))

    def _sparse_idx(self, batch: Batch, cache: PagedCache, index_topk, ring_rows: int) -> torch.Tensor:
        """-> [T, K] rows each query reads from its sources (this step's kv [T], the window rings [ring_rows], the
        entry pool), -1 = none: per query its window list, then from the sequence's window width on (`window`;
        min(n, window) in a prefill) its entry list, -1 up to the widest list of the batch. The same [T, K] as the
        per-sequence lists padded and stacked, built for all queries at once on the tokens' device (the block
        tables are copied there once per batch)."""
        win, ratio = self.window_size, self.compress_ratio
        topk = self.indexer.index_topk if index_topk is not None else None
        plan = batch.derived(("index", win, ratio, topk), lambda: _index_plan(batch, win, ratio, topk))
        # the window lists, and an HCA layer's whole lists, are functions of the batch alone: built once per batch on
        # the host and copied (`Batch.on_host`), not once per layer (the kernels only read them)
        window = partial(_window_rows, cache=cache, win=win, ring_rows=ring_rows)
        window_idx = partial(batch.on_host, ("window idx", win, ring_rows), window)  # every layer's, on the device
        if not ratio:
            return window_idx()[:, : plan.width]
        if index_topk is None:  # HCA: every completed entry

            def hca(b: Batch) -> torch.Tensor:
                # built on the device (past HOST_BUILD_ENTRIES), its lists start from the window lists the batch's
                # other layers read (built on the host), not from a device rebuild of them (~25 more launches)
                idx = window_idx() if b is batch else window(b)
                entries = self._hca_entries(b.positions, ratio, plan.n_entries)
                return _with_entries(b, cache, plan, idx, entries, ratio, ring_rows)

            # its lists walk every entry of the batch's contexts: built on the device past HOST_BUILD_ENTRIES of them
            return batch.on_host(("hca idx", win, ratio, ring_rows), hca, _hca_walk(batch, plan))
        return _with_entries(batch, cache, plan, window_idx(), index_topk, ratio, ring_rows)

    @staticmethod
    def _hca_entries(positions: torch.Tensor, ratio: int, width: int) -> torch.Tensor:
        """positions [T] -> [T, width] completed entries each query sees, -1 past them: entry j is visible to the
        query at t iff j < (t+1) // ratio (a sequence's own list is its queries' first (start+n) // ratio columns)."""
        t = positions.unsqueeze(1)  # [T, 1]
        j = torch.arange(width, device=t.device).expand(t.shape[0], -1)
        return torch.where(j >= (t + 1) // ratio, -1, j)

    def _write_ring(self, kv: torch.Tensor, batch: Batch, cache: PagedCache, ring: torch.Tensor) -> None:
        """This step's window KV into the rings, one indexed write for all sequences."""
        win = self.window_size
        # only the last `window` tokens of a sequence survive: writing more would give one ring row two positions in
        # one write (which one lands is undefined)
        keep = batch.on_host(("ring keep", win), partial(_kept_rows, window=win))
        rows = batch.on_host(("ring rows", win), partial(_ring_write_rows, cache=cache, window=win))  # [T] or [kept]
        ring.view(-1, self.head_dim)[rows] = kv if keep is None else kv[keep]


def _window_rows(batch: Batch, cache: PagedCache, win: int, ring_rows: int) -> torch.Tensor:
    """[T, win] rows each query reads from the window, -1 = none: this step's tokens from kv itself ([T] rows), the
    earlier ones from the rings after them (read before this step writes them). Made once per batch and ring size
    (`ring_rows`, the key: an HCA layer's lists start with them)."""
    key = ("window rows", win, ring_rows)
    return batch.derived(key, lambda: _window_rows_of(batch, cache, win))


def _window_rows_of(batch: Batch, cache: PagedCache, win: int) -> torch.Tensor:
    pos, tok = batch.positions, batch.per_token
    n_tokens = pos.shape[0]
    u = _window_idx(pos, win)  # [T, win] absolute positions
    rows = torch.arange(n_tokens, device=pos.device).unsqueeze(1)
    chunk_row = rows - (pos.unsqueeze(1) - u)
    ring_row = n_tokens + cache.ring_rows(tok.slot.unsqueeze(1), u)
    return torch.where(u < 0, -1, torch.where(u >= tok.start.unsqueeze(1), chunk_row, ring_row))


def _with_entries(batch: Batch, cache: PagedCache, plan, idx, entry_ids, ratio: int, ring_rows: int) -> torch.Tensor:
    """The window lists `idx` [T, win] followed by each query's entries (`entry_ids` [T, E], -1 = none) as rows of the
    pool after the chunk's and the rings' rows: from the sequence's window width on, -1 up to `plan.width`."""
    n_tokens, win = idx.shape
    # each id's row read from the requests' entry rows (built once per batch), not recomputed from the block tables
    # in every layer
    offset = n_tokens + ring_rows  # the pool's rows come after the chunk's and the rings'
    lut, first = batch.derived(("entry lookup", ratio, offset), lambda: _entry_lookup(batch, cache, ratio, offset))
    entry_idx = lut[first.unsqueeze(1) + entry_ids]  # [T, E]
    if plan.entry_cols is None:  # every list's window part is `window` wide
        return torch.cat([idx, entry_idx], dim=1)[:, : plan.width]
    out = idx.new_full((n_tokens, win + entry_idx.shape[1]), -1)
    out[:, :win] = idx  # past a prefill's window width: -1, where its entries go
    first_col = batch.derived(("entry col", win), lambda: batch.to_device(plan.entry_cols))
    cols = first_col.unsqueeze(1) + torch.arange(entry_idx.shape[1], device=idx.device)
    return out.scatter_(1, cols, entry_idx)[:, : plan.width]


@dataclass(frozen=True)
class _IndexPlan:
    """Widths of a batch's attention lists in a layer (the same in every layer of the kind)."""

    width: int  # K: the widest list of the batch
    n_entries: int  # the widest entry list (HCA: every entry the longest context completed)
    entry_cols: tuple[int, ...] | None  # [T] column where each query's entries start; None: `window` for all


def _hca_walk(batch: Batch, plan: _IndexPlan) -> int:
    """The pool entries an HCA layer's lists walk, at most: [T, n_entries] (`Batch.on_host`'s `entries`)."""
    return batch.tokens.numel() * plan.n_entries


def _index_plan(batch: Batch, window: int, ratio: int, topk: int | None) -> _IndexPlan:
    n = batch.seq_lens
    cols = [min(m, window) if s == 0 else window for m, s in zip(n, batch.start_pos)]
    entries = [c // ratio if ratio else 0 for c in batch.context_lens]
    if topk is not None:
        entries = [min(topk, e) for e in entries]
    return _IndexPlan(
        width=max(c + e for c, e in zip(cols, entries)),
        n_entries=max(entries),
        entry_cols=None if min(cols) == window else tuple(batch.spread(cols)),
    )


def _ring_write_rows(batch: Batch, cache: PagedCache, window: int) -> torch.Tensor:
    rows = cache.ring_rows(batch.per_token.slot, batch.positions)  # [T]
    keep = _kept_rows(batch, window)
    return rows if keep is None else rows[keep]


def _kept_rows(batch: Batch, window: int) -> torch.Tensor | None:
    """`_ring_keep`, once per batch (the ring write's keep mask and its rows both read it)."""
    return batch.derived(("kept rows", window), lambda: _ring_keep(batch, window))


def _ring_keep(batch: Batch, window: int) -> torch.Tensor | None:
    """Token rows among the last `window` of their sequence, or None when that is all of them."""
    if all(n <= window for n in batch.seq_lens):
        return None
    ends = batch.spread(batch.cu_seqlens[1:])  # [T] the row after each token's sequence
    return batch.to_device([r for r, end in enumerate(ends) if r >= end - window])


class OptMoE(ref.MoE):
    """Routed experts with grouped dispatch plus the shared expert (reference: ref.MoE)."""

    def __init__(self, layer_id: int, args: ModelArgs, ops, tp: TP = ONE_RANK):
        super().__init__(layer_id, args)
        self.ops = ops
        self.tp = tp
        self.scale_fmt, self.scale_dtype = args.act_scale_fmt, args.act_scale_dtype
        self._fmt = (self.scale_fmt, self.scale_dtype)
        self.input, self.route, self.output = Tap(), Tap(), Tap()  # route: (weights [T, k] fp32, expert ids [T, k])

    @staticmethod
    def _weights(e: ref.Expert) -> ExpertWeights:
        # read from the modules' own dicts: `e.w1.weight` goes through nn.Module.__getattr__ (~1 us a lookup), and
        # every eager step builds these for every expert of every layer (256 experts: 2.2 ms a layer on this CPU,
        # 0.23 ms so); a streamed block's new parameters are in these same dicts
        p1, p2, p3 = e._modules["w1"]._parameters, e._modules["w2"]._parameters, e._modules["w3"]._parameters
        return ExpertWeights(
            (p1["weight"], p1["scale"]), (p2["weight"], p2["scale"]), (p3["weight"], p3["scale"]), e.swiglu_limit
        )

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, seg: tuple[int, ...]) -> torch.Tensor:
        # x: [T, D], tokens: [T] ids (the hash-routed layers' key) -> [T, D]
        x = self.input(x)
        g = self.gate
        weights, indices = self.ops.moe_gate(
            x,
            g.weight,
            g.bias,
            getattr(g, "tid2eid", None) if g.hash else None,
            tokens,
            g.topk,
            g.score_func,
            g.route_scale,
            seg,
        )
        weights, indices = self.route(weights, indices)
        if self.tp.world > 1:  # this rank's experts only (the others are None), all-reduced before the shared one
            mine = {i: self._weights(e) for i, e in enumerate(self.experts) if e is not None}
            shared = self._weights(self.shared_experts)
            return self.output(parallel.moe(x, weights, indices, mine, shared, *self._fmt, self.tp))
        experts = [self._weights(e) for e in self.experts]
        y = self.ops.moe_experts(
            x, weights, indices, experts, self._weights(self.shared_experts), self.scale_fmt, self.scale_dtype
        )
        return self.output(y)


class OptBlock(ref.Block):
    """ref.Block over ragged tokens, with the taps of its input streams, (y, post, comb) of each mHC pre-mix and the
    streams after each post-mix."""

    def __init__(self, layer_id: int, args: ModelArgs, ops, tp: TP = ONE_RANK):
        # the attention and MoE the reference constructor builds
        self.attn_class = partial(OptAttention, ops=ops, tp=tp)
        self.ffn_class = partial(OptMoE, ops=ops, tp=tp)
        super().__init__(layer_id, args)
        self.ops = ops
        for name in ("streams_in", "hc_pre_attn", "hc_post_attn", "hc_pre_ffn", "hc_post_ffn"):
            setattr(self, name, Tap())

    def forward(self, x: torch.Tensor, batch: Batch, cache: PagedCache) -> torch.Tensor:
        # x: [T, hc, D] bf16 streams -> same
        s = self.tokens_in(x, batch.positions, batch.segments)
        o = self.attn.requests(s.attn, batch, cache)
        return self.tokens_out(o, s.residual, s.post, s.comb, s.attn.freqs, batch.tokens, batch.segments)

    # the attention's three phases (`OptAttention.forward`), the block's per-token work on either side of its middle

    def tokens_in(self, x: torch.Tensor, positions: torch.Tensor, seg: tuple[int, ...]) -> "BlockIn":
        """The attention's mHC pre-mix and norm, then its per-token work (`OptAttention.tokens_in`)."""
        ops, mix = self.ops, self._mix(seg)
        residual = x = self.streams_in(x)
        x, post, comb = self.hc_pre_attn(*ops.hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, *mix))
        x = ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps, seg)
        return BlockIn(residual, post, comb, self.attn.tokens_in(x, positions, seg))

    def tokens_out(self, o, residual, post, comb, freqs, tokens, seg: tuple[int, ...]) -> torch.Tensor:
        """o: [T, h, d] the attention core's output -> the block's output streams [T, hc, D]: the attention's output
        projections, its mHC post-mix, then the whole MoE half (`tokens`: [T] ids, the hash-routed layers' key)."""
        ops, mix = self.ops, self._mix(seg)
        x = self.attn.tokens_out(o, freqs, seg)
        residual = x = self.hc_post_attn(ops.hc_post(x, residual, post, comb))
        x, post, comb = self.hc_pre_ffn(*ops.hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, *mix))
        x = ops.rms_norm(x, self.ffn_norm.weight, self.ffn_norm.eps, seg)
        x = self.ffn(x, tokens, seg)
        return self.hc_post_ffn(ops.hc_post(x, residual, post, comb))

    def _mix(self, seg: tuple[int, ...]) -> tuple:
        """hc_pre's arguments after its weights: the row groups, the norm's eps and the Sinkhorn settings."""
        return seg, self.norm_eps, self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps


class BlockIn(NamedTuple):
    """A block's per-token work before its attention's middle (`OptBlock.tokens_in`)."""

    residual: torch.Tensor  # [T, hc, D] the input streams
    post: torch.Tensor  # the attention's mHC post-mix weights
    comb: torch.Tensor  # and combination matrix
    attn: AttnIn


# OptBlock first: the reference MTPBlock constructor then builds OptBlock's attention and MoE; OptBlock adds the taps
class OptMTPBlock(OptBlock, ref.MTPBlock):
    """MTP block over ragged tokens: main-model streams at positions i plus the token ids at i+1."""

    def __init__(self, layer_id: int, args: ModelArgs, ops, tp: TP = ONE_RANK):
        super().__init__(layer_id, args, ops, tp)
        self.tp = tp
        self.input = Tap()  # the main model's streams at the batch's positions
        self.output_logits = Tap()

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor, batch: Batch, cache: PagedCache) -> torch.Tensor:
        # h: [T, hc, D], next_ids: [T] -> MTP streams [T, hc, D]; `batch` carries the positions of h
        h = self.input(h)
        ops = self.ops
        seg = batch.segments
        e = ops.rms_norm(parallel.embed(next_ids, self.embed.weight, self.tp), self.enorm.weight, self.enorm.eps, seg)
        x = ops.rms_norm(h, self.hnorm.weight, self.hnorm.eps, seg)
        x = run_linear(ops, self.e_proj, e).unsqueeze(1) + run_linear(ops, self.h_proj, x)
        return super().forward(x, batch, cache)


class OptimizedTransformer(nn.Module):
    """embed -> hc copies -> blocks over a ragged `Batch` -> final streams; `logits()` for chosen rows.

    `tp` (default: `parallel.TP.current()`, one rank outside a process group) makes the model one rank of a
    tensor-parallel group: it then holds that rank's slices of the split parameters and experts (`parallel`)."""

    def __init__(self, args: ModelArgs, ops=None, tp: TP | None = None):
        nn.Module.__init__(self)
        self.args = args
        self.ops = ops = ops or resolve_ops()
        self.tp = tp = tp or TP.current()
        self.max_seq_len, self.norm_eps, self.hc_eps = args.max_seq_len, args.norm_eps, args.hc_eps
        self.embed = ref.ParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([OptBlock(i, args, ops, tp) for i in range(args.n_layers)])
        self.norm = ref.RMSNorm(args.dim, self.norm_eps)
        self.head = ref.ParallelHead(args.vocab_size, args.dim, self.norm_eps, self.hc_eps)
        self.mtp = nn.ModuleList()
        for i in range(args.n_mtp_layers):
            self.mtp.append(OptMTPBlock(args.n_layers + i, args, ops, tp))
            self.mtp[-1].embed, self.mtp[-1].head = self.embed, self.head
        self.hc_mult = args.hc_mult
        hc_dim = args.hc_mult * args.dim
        self.hc_head_fn = nn.Parameter(torch.empty(args.hc_mult, hc_dim, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(args.hc_mult, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))
        self.output_logits = Tap()  # (logits [m, vocab], token rows [m])
        for m in self.modules():  # every tap but the split ones (declared where they are made) is the same on all ranks
            if isinstance(m, Tap) and not hasattr(m, parallel.MERGE_ATTR):
                parallel.declare(m, "replicated")
        parallel.shard(self, tp)
        # the checkpoint reader reads whole tensors and keeps this rank's slices (`checkpoint.reader.load_params`)
        self.weight_shard = tp if tp.world > 1 else None

    @torch.inference_mode()
    def forward(self, batch: Batch, cache: PagedCache, graphs: DecodeGraphs | None = None) -> torch.Tensor:
        """-> final residual streams [T, hc, D] of every token of the batch; a decode step replays the layers'
        per-token work from `graphs` where given (`parity.optimized.graphs`)."""
        with ref.default_dtype(torch.bfloat16):
            h = parallel.embed(batch.tokens, self.embed.weight, self.tp)
            h = h.unsqueeze(1).repeat(1, self.hc_mult, 1)  # [T, hc, D]
            if graphs is not None and graphs.applies(self, batch):
                return graphs.forward(self.layers, h, batch, cache)
            for layer in self.layers:
                h = layer(h, batch, cache)
            return h

    @torch.inference_mode()
    def head_logits(self, h: torch.Tensor, batch: Batch, rows, owner: nn.Module | None = None):
        """Logits [len(rows), vocab] fp32 of token rows `rows` with the head of `owner` (the model, or an MTP block):
        the hc head runs per request over all its tokens and the fp32 head GEMM is `dense_linear` with one row per
        segment, as the reference does for one request (`get_logits` on [1, D])."""
        owner = self if owner is None else owner
        norm = self.norm if owner is self else owner.norm
        with ref.default_dtype(torch.bfloat16):
            y = self.ops.hc_head(
                h, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, batch.segments, self.norm_eps,
                self.hc_eps,
            )  # fmt: skip
            y = self.ops.rms_norm(y, norm.weight, norm.eps, batch.segments)
            # one row per segment: the torch backend's F.linear per row is the reference's [1, D] GEMM bit for bit
            rows = batch.to_device(list(rows))  # without waiting for the forward queued before it
            logits = self.ops.dense_linear(y[rows].float(), self.head.weight, tuple(range(len(rows) + 1)))
            logits = self.tp.all_gather(logits, -1)  # each rank holds a vocab slice of the head
            return owner.output_logits(logits, rows)[0]

    @torch.inference_mode()
    def mtp_logits(self, h: torch.Tensor, next_ids: torch.Tensor, batch: Batch, cache: PagedCache, rows, depth=0):
        """Run MTP block `depth` on streams h ([T, hc, D] at the batch's positions) and the tokens that follow them;
        returns (MTP streams, logits of `rows`)."""
        block = self.mtp[depth]
        with ref.default_dtype(torch.bfloat16):
            x = block(h, next_ids, batch, cache)
        return x, self.head_logits(x, batch, rows, block)

    # every submodule with caches or tables resets itself, as in the reference
    reset_buffers = ref.Transformer.reset_buffers

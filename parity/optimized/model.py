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
"""

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from parity.config import ModelArgs
from parity.optimized import parallel
from parity.optimized.batch import Batch
from parity.optimized.cache import CompressorState, PagedCache
from parity.optimized.ops import resolve_ops
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


def _window_idx(start: int, n: int, window: int) -> torch.Tensor:
    """Absolute positions each of n queries (at start..start+n-1) reads from the window, -1 = none.

    A start_pos-0 step lists min(n, window) columns (the reference prefill); any later step lists `window` columns
    (the reference decode order: oldest to newest, -1 padding at the end)."""
    width = min(n, window) if start == 0 else window
    t = torch.arange(start, start + n).unsqueeze(1)  # [n, 1]
    u = (t - window + 1).clamp(min=0) + torch.arange(width)  # [n, width]
    return torch.where(u > t, -1, u)


class OptCompressor(ref.Compressor):
    """Compressor over one request's tokens with its state rows passed in (reference: ref.Compressor)."""

    def __init__(self, args: ModelArgs, compress_ratio: int, head_dim: int, rotate: bool = False, *, ops):
        super().__init__(args, compress_ratio, head_dim, rotate)
        self.ops = ops
        self.kv_fp8 = args.kv_fp8_sim
        self.entries = Tap()  # (new entries [m, d], token rows [m] of the tokens that completed them)

    def project(self, x, segments):
        """x: [T, D] -> (kv, score) [T, coff*d] fp32: the wkv and wgate projections of every token of the batch in
        one call each (`segments`: the batch's op segments, so each request's rows run as they would alone)."""
        xf = x.float()
        kv = self.ops.dense_linear(xf, self.wkv.weight, segments)
        return kv, self.ops.dense_linear(xf, self.wgate.weight, segments)

    def compress(self, kv, score, dtype, start_pos, state: CompressorState, slot: int, freqs_cis):
        """kv, score: [n, coff*d] projections (`project`) of one request's tokens at start_pos.. -> (first entry
        id, new entries [m, d] in `dtype`, or None)."""
        ops, ratio = self.ops, self.compress_ratio
        n = kv.shape[0]
        kv_state, score_state = state.rows(slot)  # [1, coff*r, coff*d]
        if start_pos == 0:
            blocks = self.prefill_blocks(kv[None], score[None], kv_state, score_state)  # [1, m, w, d] each
            entries = ops.compress_pool(*blocks) if n >= ratio else None  # [1, m, d]
            first = 0
        else:
            # after a context the state machine runs token by token, as the reference decode path does
            pooled = []
            for i in range(n):
                block = self.decode_block(kv[i : i + 1], score[i : i + 1], start_pos + i, kv_state, score_state)
                # pooled at once: without overlap the block is the state itself, which the next token writes
                if block is not None:
                    pooled.append(ops.compress_pool(*block).unsqueeze(1))  # [1, 1, d]
            entries = torch.cat(pooled, dim=1) if pooled else None  # [1, m, d]
            first = start_pos // ratio  # the first entry a token at or after start_pos can complete
        if entries is None:
            return first, None
        m = entries.shape[1]
        entries = entries.to(dtype)[0]  # [m, d]
        # the reference normalizes a prefill's entries together and a decode's entry alone
        alone = None if start_pos == 0 else tuple(range(m + 1))
        entries = ops.rms_norm(entries, self.norm.weight, self.norm.eps, alone)
        positions = torch.arange(first, first + m, device=kv.device) * ratio
        ops.rope(entries[..., -self.rope_head_dim :], freqs_cis[positions])
        if self.rotate:
            entries = ops.hadamard(entries, entries.size(-1) ** -0.5)
            ops.fp4_fake_quant(entries, ref.FP4_BLOCK_SIZE)
        else:
            ops.kv_fake_quant(
                entries[..., : -self.rope_head_dim], KV_QUANT_BLOCK, self.scale_fmt, self.scale_dtype, self.kv_fp8
            )
        return first, entries


class OptIndexer(ref.Indexer):
    """CSA indexer over ragged tokens and paged 128-d entries (reference: ref.Indexer)."""

    def __init__(self, args: ModelArgs, compress_ratio: int, ops, tp: TP = ONE_RANK):
        self.compressor_class = partial(OptCompressor, ops=ops)  # what the reference constructor builds
        super().__init__(args, compress_ratio)
        self.ops = ops
        self.tp = tp
        self.n_local_heads = tp.local(self.n_heads, "index_n_heads")  # the weight scale keeps the global count
        self.topk = Tap()  # entry ids [T, k] (-1 = none), k = the widest of the batch

    def forward(self, x, qr, batch: Batch, cache: PagedCache, layer: int, freqs_cis, freqs):
        """x: [T, D], qr: [T, q_lora_rank] -> per sequence [n_i, k_i] top-k entry ids (-1 = none)."""
        ops, ratio = self.ops, self.compress_ratio
        q = run_linear(ops, self.wq_b, qr).unflatten(-1, (self.n_local_heads, self.head_dim))  # [T, h, d]
        ops.rope(q[..., -self.rope_head_dim :], freqs)
        q = ops.hadamard(q, q.size(-1) ** -0.5)
        ops.fp4_fake_quant(q, ref.FP4_BLOCK_SIZE)
        weights = ops.dense_linear(x, self.weights_proj.weight, batch.segments)
        weights = weights * (self.softmax_scale * self.n_heads**-0.5)  # [T, h]
        pool = cache.index_entries[layer]
        flat_pool = pool.view(-1, pool.shape[-1])
        compress_all(self.compressor, x, batch, cache.index_state[layer], freqs_cis, flat_pool, cache, ratio)
        out = []
        for i in range(batch.num_seqs):
            rows, start, end = batch.rows(i), batch.start_pos[i], batch.context_len(i)
            n_entries = end // ratio
            entries = flat_pool[cache.entry_rows(batch.block_tables[ratio][i], torch.arange(n_entries))]  # [t, d]
            k = min(self.index_topk, n_entries)
            if self.tp.world > 1:  # the ranks' head sums are all-reduced before the top-k
                out.append(parallel.indexer_topk(q[rows], entries, weights[rows], k, start, ratio, self.tp))
            else:
                out.append(ops.indexer_topk(q[rows], entries, weights[rows], k, start, ratio))
        return _split_rows(self.topk(_pad_cat(out)), out)


def compress_all(compressor, x, batch: Batch, state, freqs_cis, flat_pool, cache: PagedCache, ratio: int) -> None:
    """Run the compressor of every sequence (each its own state row), pass the new entries through the
    compressor's `entries` tap (token rows of the tokens that completed them), write them to the paged pool."""
    done = []  # (sequence, first entry id, entries [m, d])
    # the projections of all requests at once: one launch each instead of one per request (a decode step of 64
    # requests made 385 dense_linear calls, 31 % of its time on the H200: docs/perf.md); segments keep the per-request
    # bits of the torch backend
    kv, score = compressor.project(x, batch.segments)
    for i in range(batch.num_seqs):
        rows = batch.rows(i)
        first, new = compressor.compress(
            kv[rows], score[rows], x.dtype, batch.start_pos[i], state, batch.slots[i], freqs_cis
        )
        if new is not None:
            done.append((i, first, new))
    if not done:
        return
    # entry j is completed by the token at position (j+1)*ratio - 1
    token_rows = torch.cat([
        batch.cu_seqlens[i] - batch.start_pos[i] + (torch.arange(first, first + new.shape[0]) + 1) * ratio - 1
        for i, first, new in done
    ])  # fmt: skip
    entries, _ = compressor.entries(torch.cat([new for _, _, new in done]), token_rows.to(x.device))
    for (i, first, new), part in zip(done, entries.split([new.shape[0] for _, _, new in done])):
        ids = torch.arange(first, first + new.shape[0])
        flat_pool[cache.entry_rows(batch.block_tables[ratio][i], ids)] = part


def _split_rows(padded: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of `_pad_cat`: per sequence [n_i, k_i] from the padded [T, max k]."""
    parts = padded.split([t.shape[0] for t in like])
    return [p[:, : t.shape[1]] for p, t in zip(parts, like)]


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
        x = self.input(x)
        ops, layer = self.ops, self.layer_id
        win, ratio, rd = self.window_size, self.compress_ratio, self.rope_head_dim
        freqs = self.freqs_cis[batch.positions]  # [T, rd/2]
        seg = batch.segments
        qr = q = self.qr(ops.rms_norm(run_linear(ops, self.wq_a, x), self.q_norm.weight, self.eps, seg))
        q = run_linear(ops, self.wq_b, q).unflatten(-1, (self.n_local_heads, self.head_dim))  # [T, h, d]
        ops.head_norm(q, self.eps, batch.segments)
        ops.rope(q[..., -rd:], freqs)
        q = self.q(q)
        kv = self.kv(ops.rms_norm(run_linear(ops, self.wkv, x), self.kv_norm.weight, self.eps, seg))  # [T, d]
        ops.rope(kv[..., -rd:], freqs)
        ops.kv_fake_quant(kv[..., :-rd], KV_QUANT_BLOCK, self.scale_fmt, self.scale_dtype, self.kv_fp8)

        index_topk = self.indexer(x, qr, batch, cache, layer, self.freqs_cis, freqs) if self.indexer else None
        ring = cache.window[layer]  # [slots, win, d]
        pool = cache.entries[layer]
        if ratio:
            flat_pool = pool.view(-1, self.head_dim)
            compress_all(self.compressor, x, batch, cache.state[layer], self.freqs_cis, flat_pool, cache, ratio)
        n_tokens, ring_rows = x.shape[0], ring.shape[0] * win
        idx_rows = []
        for i in range(batch.num_seqs):
            start, n = batch.start_pos[i], batch.seq_len(i)
            # window: this step's tokens come from kv itself, earlier ones from the ring (read before it is written)
            u = _window_idx(start, n, win)
            chunk_row = batch.cu_seqlens[i] + (u - start)
            ring_row = n_tokens + cache.ring_rows(batch.slots[i], u)
            idx = torch.where(u < 0, -1, torch.where(u >= start, chunk_row, ring_row))
            if ratio:
                table = batch.block_tables[ratio][i]
                # index math runs on the host: block tables are host metadata
                entry_ids = index_topk[i].cpu() if index_topk is not None else self._hca_entries(start, n, ratio)
                entry_row = n_tokens + ring_rows + cache.entry_rows(table, entry_ids.clamp(min=0))
                idx = torch.cat([idx, torch.where(entry_ids < 0, -1, entry_row)], dim=1)
            idx_rows.append(idx)
        idx = _pad_cat(idx_rows)  # [T, K]
        o = ops.sparse_attn(
            q,
            (kv, ring.view(-1, self.head_dim), pool.view(-1, self.head_dim) if ratio else kv[:0]),
            idx.to(x.device),
            self.attn_sink,
            self.softmax_scale,
        )
        self._write_ring(kv, batch, cache, ring)
        ops.rope(o[..., -rd:], freqs, True)
        o = ops.o_lora(o.flatten(1), self.wo_a.weight, self.n_local_groups, self.o_lora_rank, seg)  # [T, g, rank]
        # wo_b is row-parallel: the ranks' partial outputs are all-reduced (nothing to do on one rank)
        return self.output(parallel.row_parallel(run_linear(ops, self.wo_b, self.o_lora(o.flatten(1))), self.tp))

    @staticmethod
    def _hca_entries(start: int, n: int, ratio: int) -> torch.Tensor:
        # every completed entry; entry j is visible to the query at t iff j < (t+1) // ratio
        t = torch.arange(start, start + n).unsqueeze(1)
        j = torch.arange((start + n) // ratio).expand(n, -1)
        return torch.where(j >= (t + 1) // ratio, -1, j)

    def _write_ring(self, kv: torch.Tensor, batch: Batch, cache: PagedCache, ring: torch.Tensor) -> None:
        flat = ring.view(-1, self.head_dim)
        for i in range(batch.num_seqs):
            rows, start, n = batch.rows(i), batch.start_pos[i], batch.seq_len(i)
            # only the last `window` tokens survive; writing more would give one slot two positions at once
            keep = min(n, self.window_size)
            pos = torch.arange(start + n - keep, start + n)
            flat[cache.ring_rows(batch.slots[i], pos)] = kv[rows][n - keep :]


def _pad_cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sequence [n_i, K_i] index lists into [T, max K], padding with -1 (trailing -1 cost nothing)."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])


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
        return ExpertWeights(
            (e.w1.weight, e.w1.scale), (e.w2.weight, e.w2.scale), (e.w3.weight, e.w3.scale), e.swiglu_limit
        )

    def forward(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        x = self.input(x)
        g = self.gate
        weights, indices = self.ops.moe_gate(
            x,
            g.weight,
            g.bias,
            getattr(g, "tid2eid", None) if g.hash else None,
            batch.tokens,
            g.topk,
            g.score_func,
            g.route_scale,
            batch.segments,
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
        ops = self.ops
        mix = (batch.segments, self.norm_eps, self.hc_mult, self.hc_sinkhorn_iters, self.hc_eps)
        residual = x = self.streams_in(x)
        x, post, comb = self.hc_pre_attn(*ops.hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, *mix))
        x = ops.rms_norm(x, self.attn_norm.weight, self.attn_norm.eps, batch.segments)
        x = self.attn(x, batch, cache)
        residual = x = self.hc_post_attn(ops.hc_post(x, residual, post, comb))

        x, post, comb = self.hc_pre_ffn(*ops.hc_pre(x, self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, *mix))
        x = ops.rms_norm(x, self.ffn_norm.weight, self.ffn_norm.eps, batch.segments)
        x = self.ffn(x, batch)
        return self.hc_post_ffn(ops.hc_post(x, residual, post, comb))


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
    def forward(self, batch: Batch, cache: PagedCache) -> torch.Tensor:
        """-> final residual streams [T, hc, D] of every token of the batch."""
        with ref.default_dtype(torch.bfloat16):
            h = parallel.embed(batch.tokens, self.embed.weight, self.tp)
            h = h.unsqueeze(1).repeat(1, self.hc_mult, 1)  # [T, hc, D]
            for layer in self.layers:
                h = layer(h, batch, cache)
            return h

    @torch.inference_mode()
    def head_logits(self, h: torch.Tensor, batch: Batch, rows, owner: nn.Module | None = None):
        """Logits [len(rows), vocab] fp32 of token rows `rows` with the head of `owner` (the model, or an MTP block):
        the hc head runs per request over all its tokens and the fp32 head GEMM one row at a time, as the reference
        does for one request (`get_logits` on [1, D])."""
        owner = self if owner is None else owner
        norm = self.norm if owner is self else owner.norm
        with ref.default_dtype(torch.bfloat16):
            y = self.ops.hc_head(
                h, owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base, batch.segments, self.norm_eps,
                self.hc_eps,
            )  # fmt: skip
            y = self.ops.rms_norm(y, norm.weight, norm.eps, batch.segments)
            logits = torch.cat([F.linear(y[r : r + 1].float(), self.head.weight) for r in rows])
            logits = self.tp.all_gather(logits, -1)  # each rank holds a vocab slice of the head
            return owner.output_logits(logits, torch.as_tensor(list(rows), device=h.device))[0]

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

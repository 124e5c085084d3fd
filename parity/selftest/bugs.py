"""A library of realistic DeepSeek-V4 bring-up bugs, each planted into the optimized side only.

Each bug stands for a class of mistakes seen while bringing V4 up on new kernels (ATOM PRs #650, #658, #676, #996
and the issues of other engines): quantization scale rounding and scale formats, routing scale, the wo_a scale
collapse, window / compress-boundary / causal-limit off-by-ones, the attention sink, paged-cache addressing,
compressor state across chunks, the mHC Sinkhorn, the MTP input stream, skipped KV fake-quant. A bug changes the
resolved ops (`ops`, a function of the `Ops` table) or patches optimized-model code for the duration of a run
(`patch`, a context manager); the reference is never touched.

`expect` says where a verdict must put the first failure for the bug to count as localized: the layer (block index
in execution order, MTP blocks after the main layers), the sub-modules (site labels of `compare.sites`) and the
phases it may show first in.
"""

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from parity.formats import e8m0_to_float
from parity.optimized import cache as opt_cache
from parity.optimized import model as opt_model
from parity.optimized.ops import Ops


@dataclass(frozen=True)
class Expect:
    layer: int
    submodules: tuple[str, ...]
    phases: tuple[str, ...] = ("prefill", "chunk", "decode", "mtp")


@dataclass(frozen=True)
class Bug:
    name: str
    history: str  # the real bug class it stands for
    expect: Expect
    ops: Callable[[Ops], Ops] | None = None
    patch: Callable[[], AbstractContextManager] = field(default=nullcontext)


def _replace(**fns) -> Callable[[Ops], Ops]:
    """An ops transform replacing some ops by functions of the original ops: `_replace(op=lambda ops: fn)`."""
    return lambda ops: dataclasses.replace(ops, **{name: make(ops) for name, make in fns.items()})


@contextmanager
def _setattr(owner, name: str, value) -> Iterator[None]:
    # the raw class attribute (a staticmethod stays a staticmethod when it is put back)
    saved = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


# --- quantization --------------------------------------------------------------------------------------------------


def _act_quant_round_nearest(ops: Ops):
    # ue8m0 scale rounded to the NEAREST power of two instead of up: amax/s can exceed 448 and saturate
    def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
        xf = x.float().unflatten(-1, (-1, block_size))
        amax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-4)
        s = torch.exp2(torch.round(torch.log2(amax / 448.0)))
        y = (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn).flatten(-2)
        return y, s.squeeze(-1).to(scale_dtype)

    return act_quant


def _fp8_scale_as_uint8(ops: Ops):
    # the e8m0 weight scales read as their integer bytes (a uint8 copy of a float8_e8m0fnu tensor), not 2^(b-127)
    def fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
        wrong = b_s.view(torch.uint8).float() * 2.0**-127 if b_s.dtype == torch.float8_e8m0fnu else b_s
        return ops.fp8_gemm(a, a_s, b, wrong.contiguous(), torch.float32)

    return fp8_gemm


def _fp4_scale_unbiased(ops: Ops):
    # FP4 expert group scales decoded without the e8m0 bias, each relative to its row's largest (2^(b - b_max)
    # instead of 2^(b - 127)): every routed expert's weight rows come out scaled by a per-row constant
    def moe_experts(x, weights, indices, experts, shared, scale_fmt, scale_dtype):
        def wrong(w, s):
            f = e8m0_to_float(s)
            return w, (f / f.amax(-1, keepdim=True)).contiguous()

        bad = [dataclasses.replace(e, w1=wrong(*e.w1), w3=wrong(*e.w3), w2=wrong(*e.w2)) for e in experts]
        return ops.moe_experts(x, weights, indices, bad, shared, scale_fmt, scale_dtype)

    return moe_experts


def _kv_fake_quant_skipped(ops: Ops):
    # the window KV / compressed entries are not FP8-simulated (a kernel that forgot the current revision's cast)
    def kv_fake_quant(x, block, scale_fmt, scale_dtype, fp8=True):
        return x

    return kv_fake_quant


# --- MoE -----------------------------------------------------------------------------------------------------------


def _route_scale_dropped(ops: Ops):
    def moe_gate(x, weight, bias, tid2eid, input_ids, topk, score_func, route_scale, cu_seqlens):
        return ops.moe_gate(x, weight, bias, tid2eid, input_ids, topk, score_func, 1.0, cu_seqlens)

    return moe_gate


# --- attention -----------------------------------------------------------------------------------------------------


def _o_lora_per_tensor_scale(ops: Ops):
    # wo_a in FP8 with ONE per-tensor scale instead of its 128x128 block scales (ATOM PR #676's collapse)
    # (an fp32 scale amax / 448, as the per-tensor recipe has it: a power-of-two one would leave the synthetic
    # checkpoint's uniform block scales unchanged and the bug invisible)
    def o_lora(o, wo_a, n_groups, rank, segments):
        w = wo_a.float()
        s = w.abs().amax().clamp(min=1e-12) / 448.0
        collapsed = ((w / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s).to(torch.bfloat16)
        return ops.o_lora(o, collapsed, n_groups, rank, segments)

    return o_lora


def _sink_scaled(ops: Ops):
    def sparse_attn(q, sources, idx, attn_sink, softmax_scale):
        return ops.sparse_attn(q, sources, idx, attn_sink * softmax_scale, softmax_scale)

    return sparse_attn


def _ring_neighbour_row(ops: Ops):
    # the window ring read one row off: a query's cached window rows come from the slot's next row
    def sparse_attn(q, sources, idx, attn_sink, softmax_scale):
        chunk, ring = sources[0].shape[0], sources[1].shape[0]
        in_ring = (idx >= chunk) & (idx < chunk + ring)
        shifted = torch.where(in_ring, chunk + (idx - chunk + 1) % ring, idx)
        return ops.sparse_attn(q, sources, shifted, attn_sink, softmax_scale)

    return sparse_attn


def _window_127():
    # the window list drops its oldest slot (127 instead of 128 columns): wrong from position 127 on, after a context
    # (a prefill's queries list at most their own position + 1 <= 127 slots there)
    window_idx = opt_model._window_idx

    def buggy(positions, window):
        idx = window_idx(positions, window)
        return torch.where(idx <= positions.unsqueeze(1) - window + 1, -1, idx)

    return _setattr(opt_model, "_window_idx", buggy)


def _hca_entry_early():
    # an HCA entry becomes visible one token before its block is complete (in a prefill or chunk, where that block
    # completes later in the same step and is already in the pool)
    def buggy(positions, ratio, width):
        t = positions.unsqueeze(1)
        j = torch.arange(width, device=t.device).expand(t.shape[0], -1)
        return torch.where(j >= (t + 2) // ratio, -1, j)

    return _setattr(opt_model.OptAttention, "_hca_entries", staticmethod(buggy))


def _plant_entry_ahead(out, start_pos: int, n_entries: int, ratio: int):
    # out: one request's [L, k] ids -> a copy with the entry one step ahead (where it exists) in the last column of
    # the rows whose own block is still building it
    t = torch.arange(start_pos, start_pos + out.shape[0], device=out.device)
    extra = ((t + 2) // ratio).clamp(max=n_entries) - 1  # the entry one step ahead, where it exists
    ahead = (extra >= (t + 1) // ratio) & (extra >= 0)
    if out.shape[1] and bool(ahead.any()):
        out = out.clone()
        out[ahead, -1] = extra[ahead]
    return out


def _indexer_causal_off_by_one(ops: Ops):
    # the indexer lets a query see the entry its own block is still building (limit (t+2)//r instead of (t+1)//r)
    def indexer_topk(q, entries, weights, k, start_pos, ratio):
        out = ops.indexer_topk(q, entries, weights, k, start_pos, ratio)
        return _plant_entry_ahead(out, start_pos, entries.shape[0], ratio)

    return indexer_topk


def _indexer_ragged_causal_off_by_one(ops: Ops):
    # the same mistake in the batched form the engine calls on one rank: each sequence's rows, within its own k
    def indexer_topk_ragged(q, pool, entry_rows, weights, cu_seqlens, cu_entries, k, start_pos, ratio):
        out = ops.indexer_topk_ragged(q, pool, entry_rows, weights, cu_seqlens, cu_entries, k, start_pos, ratio)
        out = out.clone()
        for i, (ki, start) in enumerate(zip(k, start_pos)):
            rows = slice(cu_seqlens[i], cu_seqlens[i + 1])
            out[rows, :ki] = _plant_entry_ahead(out[rows, :ki], start, cu_entries[i + 1] - cu_entries[i], ratio)
        return out

    return indexer_topk_ragged


def _paged_block_stride():
    # block ids scaled by the wrong stride in the flat pool: entry e lands in row table[e // bs] * (bs - 1) + e % bs,
    # so neighbouring blocks overlap and later entries overwrite earlier ones
    def entry_rows(self, table, entries):
        bs = self.block_size
        return table.long()[entries // bs] * (bs - 1) + entries % bs

    return _setattr(opt_cache.PagedCache, "entry_rows", entry_rows)


def _compressor_reset_between_chunks():
    # a chunk after a context starts from an empty compressor state (the state was keyed by step, not by request)
    compress_all = opt_model.compress_all

    def buggy(compressor, kv, score, batch, state, *rest):
        for i in range(batch.num_seqs):
            if batch.start_pos[i] > 0 and batch.seq_len(i) > 1:
                state.reset(batch.slots[i])
        return compress_all(compressor, kv, score, batch, state, *rest)

    return _setattr(opt_model, "compress_all", buggy)


# --- mHC and MTP ---------------------------------------------------------------------------------------------------


def _sinkhorn_19(ops: Ops):
    def hc_pre(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters, hc_eps):
        return ops.hc_pre(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters - 1, hc_eps)

    return hc_pre


def _mtp_stream_shift():
    # the MTP block fed the main streams of the NEXT position (an off-by-one between streams and token ids)
    forward = opt_model.OptMTPBlock.forward

    def buggy(self, h, next_ids, batch, cache):
        shifted = h.clone()
        for i in range(batch.num_seqs):
            rows = batch.rows(i)
            if rows.stop - rows.start > 1:
                shifted[rows.start : rows.stop - 1] = h[rows.start + 1 : rows.stop]
        return forward(self, shifted, next_ids, batch, cache)

    return _setattr(opt_model.OptMTPBlock, "forward", buggy)


def _rope_not_interleaved(ops: Ops):
    # rotary pairs taken as (i, i + r/2) halves instead of interleaved (2i, 2i+1)
    def rope(x, freqs_cis, inverse=False):
        half = x.shape[-1] // 2
        pairs = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten().to(x.device)
        y = x[..., pairs].clone()  # [x0, x_h, x1, x_h+1, ...]: the halves presented as interleaved pairs
        ops.rope(y, freqs_cis, inverse)
        x[..., pairs] = y
        return x

    return rope


ATTN, FFN, Q_PROJ = "attention core", "experts", "attention q projection"
# a bug in every FP8 GEMM shows first at the first attention site after one: wq_a's, wkv's, or wq_b's (in the core)
FP8_LINEARS = (Q_PROJ, "attention kv projection", ATTN)


def library(n_layers: int) -> list[Bug]:
    """The planted bugs for a model of `n_layers` main layers with the tiny layout: layer 0 SWA + hash routing,
    layer 1 CSA (ratio 4, indexer), layer 2 HCA (ratio 128), layer 3 CSA, then the MTP block."""
    mtp = n_layers
    return [
        Bug("ue8m0-round-nearest", "act_quant scale rounded to nearest instead of up (ue8m0 ceil)",
            Expect(0, FP8_LINEARS), ops=_replace(act_quant=_act_quant_round_nearest)),
        Bug("e8m0-read-as-uint8", "FP8 weight scales read as raw bytes (e8m0 copied through uint8)",
            Expect(0, FP8_LINEARS), ops=_replace(fp8_gemm=_fp8_scale_as_uint8)),
        Bug("fp4-scale-bias-lost", "FP4 expert group scales decoded without the e8m0 bias",
            Expect(0, (FFN,)), ops=_replace(moe_experts=_fp4_scale_unbiased)),
        Bug("route-scale-dropped", "routing weights not multiplied by route_scale",
            Expect(0, ("gate",)), ops=_replace(moe_gate=_route_scale_dropped)),
        Bug("wo_a-per-tensor-scale", "wo_a FP8 block scales collapsed to one per-tensor scale (ATOM #676)",
            Expect(0, (ATTN,)), ops=_replace(o_lora=_o_lora_per_tensor_scale)),
        Bug("sink-scaled", "attention sink multiplied by the softmax scale",
            Expect(0, (ATTN,)), ops=_replace(sparse_attn=_sink_scaled)),
        Bug("window-127", "sliding window one slot short after a context (off-by-one at 127/128)",
            Expect(0, (ATTN,), ("chunk", "decode")), patch=_window_127),
        Bug("ring-neighbour-row", "window ring read one row off (slot/neighbour-row read)",
            Expect(0, (ATTN,), ("chunk", "decode")), ops=_replace(sparse_attn=_ring_neighbour_row)),
        Bug("hca-entry-early", "HCA entry visible one token before its block completes (compress boundary)",
            Expect(2, (ATTN,)), patch=_hca_entry_early),
        Bug("indexer-causal-off-by-one", "indexer sees the entry its own block is still building",
            Expect(1, ("indexer",)), ops=_replace(indexer_topk=_indexer_causal_off_by_one,
                                                  indexer_topk_ragged=_indexer_ragged_causal_off_by_one)),
        Bug("paged-block-stride", "paged KV block ids scaled by the wrong stride (block-table offset)",
            Expect(1, (ATTN, "indexer", "compressor", "indexer compressor")), patch=_paged_block_stride),
        # the reset hits every multi-token chunk after a context, an MTP verify chunk too, whose rows are decode rows
        # (measured: `boundaries` on the H200 shows it first at a verify chunk of a 3-token prompt)
        Bug("compressor-reset-between-chunks", "compressor state reset at every prefill chunk",
            Expect(1, ("indexer compressor", "compressor"), ("chunk", "decode")),
            patch=_compressor_reset_between_chunks),
        Bug("sinkhorn-19", "mHC Sinkhorn run 19 iterations instead of 20",
            Expect(0, ("mHC pre (attention)",)), ops=_replace(hc_pre=_sinkhorn_19)),
        Bug("mtp-stream-shift", "MTP block fed the main streams of the next position",
            Expect(mtp, ("MTP input streams",), ("mtp",)), patch=_mtp_stream_shift),
        Bug("kv-fake-quant-skipped", "window KV and compressed entries not FP8 fake-quantized",
            Expect(0, (ATTN,)), ops=_replace(kv_fake_quant=_kv_fake_quant_skipped)),
        Bug("rope-not-interleaved", "RoPE pairs taken as halves instead of interleaved",
            Expect(0, (Q_PROJ, ATTN)), ops=_replace(rope=_rope_not_interleaved)),
    ]  # fmt: skip

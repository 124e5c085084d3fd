"""indexer_topk_ragged: `indexer_topk` for a whole batch, each sequence's entries read from the flat paged pool
through row ids.

Twin: the per-request op of the same backend (`indexer_topk`, itself judged against the reference indexer in
test_indexer_topk.py), called per sequence on that sequence's gathered entries, padded with -1 to the batch's
widest k. Every backend must give exactly those ids (`torch.equal`): the torch backend is that loop; the triton
one scores and ranks all rows at once but with the per-request kernel's numerics and its tie rule (equal scores in
ascending entry id), so its ids equal the per-request triton op's, ties included.

Batches are awkward on purpose: a prefill next to decodes and chunks, sequences with no entry (k 0), k below and
above the entry count, entry counts exactly at a block boundary, rows whose k differ, block tables that interleave
the sequences' blocks out of order and reach the pool's last block. Pool rows that hold no entry are NaN, so a read
outside a sequence's own entries shows.
"""

import pytest
import torch

from parity.optimized.ops import OpsConfig, resolve_ops
from tests.optimized.ops.test_indexer_topk import RATIO, D, fp4_rotated

OP = "indexer_topk_ragged"
BS = 16  # entries per block


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def make_batch(seqs, h=4, index_topk=16, num_blocks=24, seed=0):
    """seqs: [(start_pos, tokens)] -> the ragged call's operands, with each sequence's blocks taken from a shuffled
    pool (interleaved between sequences, the last block first)."""
    torch.manual_seed(seed)
    counts = [(s + n) // RATIO for s, n in seqs]
    need = [-(-c // BS) for c in counts]
    order = torch.randperm(num_blocks - 1).tolist()
    free = [num_blocks - 1, *order]  # block ids near the end of the pool are used
    assert sum(need) <= len(free)
    tables = [[] for _ in need]
    while any(len(t) < m for t, m in zip(tables, need)):  # round robin: the sequences' blocks interleave
        for t, m in zip(tables, need):
            if len(t) < m:
                t.append(free.pop(0))
    taken = [b for t in tables for b in t]
    assert len(taken) == len(set(taken)) == sum(need), tables
    pool = torch.full((num_blocks * BS, D), float("nan"), dtype=torch.bfloat16)
    rows = []
    for c, table in zip(counts, tables):
        e = torch.arange(c)
        r = torch.tensor(table, dtype=torch.int64)[e // BS] * BS + e % BS if c else torch.zeros(0, dtype=torch.int64)
        pool[r] = fp4_rotated(c, D) if c else pool[r]
        rows.append(r)
    n_tokens = sum(n for _, n in seqs)
    q = fp4_rotated(n_tokens, h, D)
    weights = torch.randn(n_tokens, h).to(torch.bfloat16) * (D**-0.5 * h**-0.5)
    cu_seqlens = tuple(int(x) for x in torch.tensor([0, *[n for _, n in seqs]]).cumsum(0))
    cu_entries = tuple(int(x) for x in torch.tensor([0, *counts]).cumsum(0))
    return dict(
        q=q, pool=pool, entry_rows=torch.cat(rows), weights=weights, cu_seqlens=cu_seqlens, cu_entries=cu_entries,
        k=tuple(min(index_topk, c) for c in counts), start_pos=tuple(s for s, _ in seqs),
    )  # fmt: skip


def run(impl, b, **kwargs):
    dev = device_of(impl)
    t = {name: v.to(dev) if isinstance(v, torch.Tensor) else v for name, v in b.items()}
    return impl(t["q"], t["pool"], t["entry_rows"], t["weights"], t["cu_seqlens"], t["cu_entries"], t["k"],
                t["start_pos"], RATIO, **kwargs).cpu()  # fmt: skip


def per_sequence(impl, b, **kwargs):
    """The twin: the same backend's `indexer_topk` per sequence on its gathered entries, -1 padded."""
    dev = device_of(impl)
    per_request = resolve_ops(OpsConfig(overrides=(("indexer_topk", impl.backend),))).indexer_topk
    width = max(b["k"], default=0)
    out = torch.full((b["q"].shape[0], width), -1, dtype=torch.int64)
    entries = b["pool"][b["entry_rows"]]
    cu, ce = b["cu_seqlens"], b["cu_entries"]
    for i, (k, start) in enumerate(zip(b["k"], b["start_pos"])):
        rows = slice(cu[i], cu[i + 1])
        own = entries[ce[i] : ce[i + 1]]
        got = per_request(b["q"][rows].to(dev), own.to(dev), b["weights"][rows].to(dev), k, start, RATIO, **kwargs)
        out[rows, :k] = got.cpu()
    return out


BATCHES = {
    # a prefill next to decodes and a chunk; decodes with 0 entries (k 0), 1 entry, 16 (a block boundary), 32
    "prefill-and-decodes": [(0, 37), (2, 1), (3, 1), (63, 1), (129, 1), (37, 5), (40, 1)],
    # entry counts exactly at block boundaries (16, 32, 48 entries), a prefill that completes two whole blocks
    "block-boundaries": [(63, 1), (0, 128), (191, 1), (124, 4)],
    # engine-like decode step: one token each, contexts of every size around the top-k width
    "decodes": [(p, 1) for p in (3, 7, 60, 63, 64, 65, 67, 100, 127, 128, 250)],
    # no sequence has an entry: [T, 0]
    "no-entries": [(0, 3), (1, 1), (0, 2)],
    # a prefill without entries yet next to decodes with many, and a chunk crossing index_topk
    "prefill-without-entries": [(0, 3), (300, 1), (20, 129)],
}


@pytest.mark.parametrize("name", list(BATCHES))
@pytest.mark.parametrize("index_topk", [16, 8])
def test_ragged_equals_the_per_sequence_op(impl, name, index_topk):
    b = make_batch(BATCHES[name], index_topk=index_topk)
    got = run(impl, b)
    want = per_sequence(impl, b)
    assert got.dtype == torch.int64 and got.shape == (b["q"].shape[0], max(b["k"]))
    assert torch.equal(got, want)


def test_rows_whose_k_differ_are_padded_past_their_own_k(impl):
    b = make_batch([(0, 37), (63, 1), (400, 1), (7, 1)], index_topk=16)  # k 9, 16, 16, 2
    got = run(impl, b)
    cu = b["cu_seqlens"]
    assert got.shape[1] == 16
    assert (got[cu[3] : cu[4], 2:] == -1).all() and (got[cu[3] : cu[4], :2] >= 0).all()
    assert (got[: cu[1], 9:] == -1).all()
    assert torch.equal(got, per_sequence(impl, b))


def test_all_scores_tied(impl):
    # zero head weights: every score is 0; torch: the per-request op's own order, triton: ascending id in both
    b = make_batch([(40, 9), (63, 1), (0, 37)], index_topk=8)
    b["weights"] = torch.zeros_like(b["weights"])
    assert torch.equal(run(impl, b), per_sequence(impl, b))


@pytest.mark.parametrize("method", ["rank", "merge", "radix"])
def test_every_top_k_kernel(impl, method):
    # the triton backend's long-row kernels (the chunked bitonic merge, the radix select) on short rows, tiny chunks
    if impl.backend != "triton":
        pytest.skip("only the triton backend has several top-k kernels")
    b = make_batch([(400, 3), (63, 1), (0, 37), (2, 1)], index_topk=8, num_blocks=40)
    kwargs = dict(method=method, chunk=16)
    assert torch.equal(run(impl, b, **kwargs), per_sequence(impl, b))


def test_output_is_fully_written(impl, monkeypatch):
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(12345)

    b = make_batch(BATCHES["prefill-and-decodes"])
    want = per_sequence(impl, b)
    monkeypatch.setattr(torch, "empty", poisoned)
    got = run(impl, b)
    monkeypatch.undo()
    assert torch.equal(got, want)


@pytest.mark.parametrize("bug", ["neighbour's entry table", "causal limit off by one"])
def test_planted_bug_is_caught(impl, bug):
    b = make_batch([(60, 1), (100, 1), (0, 37), (63, 2)])
    want = per_sequence(impl, b)
    if bug == "neighbour's entry table":  # sequence 1's entries start at sequence 0's (the base one row early)
        rows, (_, a, b1) = b["entry_rows"], b["cu_entries"][:3]
        b = dict(b, entry_rows=torch.cat([rows[:a], rows[: b1 - a], rows[b1:]]))
    else:  # each query sees one position further: (p + 2) // 4 entries
        b = dict(b, start_pos=tuple(s + 1 for s in b["start_pos"]))
    got = run(impl, b)
    assert not torch.equal(got, want)

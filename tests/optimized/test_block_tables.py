"""The engine's block tables are rows of its per-slot table (`Engine.block_rows`, written where blocks are allocated),
equal at every step to the tables built from the requests' block lists: -1 past each request's blocks, also in a
slot whose earlier request held more blocks (slots are reused here: 2 slots, 5 requests; chunked prefills and MTP
drafts reserve blocks at every kind of step)."""

import torch

from parity.checkpoint import build_model
from parity.optimized import model as opt_model
from parity.optimized.engine import Engine, EngineConfig

LENGTHS = (150, 37, 131, 4, 90)


def tables_from_lists(reqs, ratios) -> dict[int, torch.Tensor]:
    """The tables as the requests' block lists say, padded with -1 (the engine's form before `block_rows`)."""
    out = {}
    for r in ratios:
        width = max(1, max(len(q.blocks[r]) for q in reqs))
        out[r] = torch.tensor([q.blocks[r] + [-1] * (width - len(q.blocks[r])) for q in reqs], dtype=torch.int32)
    return out


def test_block_tables_are_the_requests_block_lists(tiny_ckpt, tiny_args, monkeypatch):
    model, _ = build_model(tiny_ckpt, factory=lambda a: opt_model.OptimizedTransformer(a))
    engine = Engine(model, EngineConfig(max_requests=2, chunk_size=48, token_budget=96, mtp_draft=1))
    g = torch.Generator().manual_seed(0)
    for n in LENGTHS:
        engine.add_request(torch.randint(0, tiny_args.vocab_size, (n,), generator=g), 3)
    seen = set()  # request ids in the tables
    last = {}  # slot -> (request id, blocks it held at its last step)
    reused_smaller = []  # a request in a slot whose earlier request held more blocks: the row's -1s matter there
    own = engine._tables

    def checked(reqs):
        got, want = own(reqs), tables_from_lists(reqs, engine.ratios)
        assert got.keys() == want.keys()
        for r in want:
            assert got[r].dtype == torch.int32 and torch.equal(got[r], want[r]), (r, got[r], want[r])
        for q in reqs:
            held = sum(len(b) for b in q.blocks.values())
            before = last.get(q.slot)
            if before is not None and before[0] != q.id and held < before[1]:
                reused_smaller.append(q.id)
            last[q.slot] = (q.id, held)
            seen.add(q.id)
        return got

    monkeypatch.setattr(engine, "_tables", checked)
    engine.run()
    assert len(engine.finished) == len(LENGTHS) and seen == set(range(len(LENGTHS)))
    assert reused_smaller

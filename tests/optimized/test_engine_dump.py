"""Dumping an engine run with parity.dump: phase tags around every forward, then the compare tools on the dump."""

import torch

from parity import dump
from parity.checkpoint import build_model
from parity.compare.loader import load_dump
from parity.compare.slots import slot_invariance
from parity.dump import DumpConfig
from parity.optimized.cache import CompressorState
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.model import OptimizedTransformer

MODULES = r"^(layers\.\d+|mtp\.\d+\.(attn|ffn))$"


def _dumped_run(ckpt, out_dir, prompts, keys):
    """Run `prompts` through one engine (MTP on), dumping the blocks with phase, step, layout and request tags."""
    model, _ = build_model(ckpt, factory=OptimizedTransformer)

    def tag(phase, step, batch):
        return dump.phase(phase, step, cu_seqlens=batch.cu_seqlens, requests=[keys[r] for r in batch.request_ids])

    engine = Engine(model, EngineConfig(chunk_size=48, token_budget=1024, mtp_draft=1), on_phase=tag)
    for p in prompts:
        engine.add_request(p, 4)
    with dump.install(model, DumpConfig(dir=str(out_dir), modules=MODULES)):
        engine.run()
    return load_dump(out_dir)


def test_engine_dump_is_tagged_and_slot_invariant(tiny_ckpt, tiny_args, tmp_path):
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randint(0, tiny_args.vocab_size, (n,), generator=g) for n in (70, 9))
    # the same prompt twice (slots 0 and 2) next to another request
    d = _dumped_run(tiny_ckpt, tmp_path / "dump", [a, b, a], {0: "a", 1: "b", 2: "a"})
    phases = {r.phase for r in d.records}
    assert phases == {"prefill", "mtp-verify", "mtp-draft"}  # with MTP on, every decode verifies a draft
    assert all(r.cu_seqlens is not None and r.requests is not None for r in d.records)
    report = slot_invariance(d)
    assert report.passed and len(report.rows) > 0


def test_slot_invariance_names_a_planted_slot_dependent_state_read(tiny_ckpt, tiny_args, tmp_path, monkeypatch):
    """Every request reading the compressor state of slot 0 makes the copy in slot 2 differ from the one in slot 0;
    the report names the first layer that has a compressor (layer 1, CSA)."""
    monkeypatch.setattr(CompressorState, "rows", lambda self, slot: (self.kv[0:1], self.score[0:1]))
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randint(0, tiny_args.vocab_size, (n,), generator=g) for n in (70, 9))
    d = _dumped_run(tiny_ckpt, tmp_path / "dump", [a, b, a], {0: "a", 1: "b", 2: "a"})
    report = slot_invariance(d)
    assert not report.passed
    assert report.first.record.layer == 1

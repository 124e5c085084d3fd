"""Layer-streamed weights (`parity.stream`): the streamed model computes bit for bit what the loaded one does, a
verdict's captures are identical record for record, one block is resident at a time, and the memory bound holds
(and fails when blocks are never released)."""

from dataclasses import replace

import pytest
import torch

from parity.capture.session import capture
from parity.cases import load_case, parse_case
from parity.checkpoint import Checkpoint, build_model
from parity.config import ModelArgs
from parity.reference.generate import greedy_generate
from parity.run import prepare_checkpoint, run_inputs
from parity.stream import build_streamed
from parity.stream import weights as stream_weights
from parity.stream.check import first_difference
from parity.stream.memory import MiB, StreamMemory

CASE = {
    "name": "stream",
    "model": {"preset": "tiny"},
    "requests": [{"prompt_len": 9, "decode_steps": 2}, {"prompt_len": 6, "decode_steps": 1}],
    "engine": {"chunk_size": 4, "token_budget": 8},
}


def _resident(model) -> list[str]:
    """The blocks whose own weights are in memory (an MTP block's shared embed/head are the model's)."""
    shared = {id(model.embed.weight), id(model.head.weight)}
    held = lambda block: any(not p.is_meta for p in block.parameters() if id(p) not in shared)  # noqa: E731
    return [n for n, b in model.named_modules() if stream_weights.BLOCK.match(n) and held(b)]


def test_streamed_generation_is_bitwise_and_holds_one_block(tiny_ckpt, tiny_args):
    loaded, _ = build_model(tiny_ckpt)
    streamed, _ = build_streamed(tiny_ckpt)
    seen = []
    for block in [*streamed.layers, *streamed.mtp]:
        block.register_forward_pre_hook(lambda m, a: seen.append(_resident(streamed)))
    assert _resident(streamed) == []
    prompt = torch.randint(0, tiny_args.vocab_size, (20,), generator=torch.Generator().manual_seed(4))
    want = greedy_generate(loaded, prompt, 3, prefill_len=12)
    got = greedy_generate(streamed, prompt, 3, prefill_len=12)
    assert got.tokens == want.tokens and got.mtp_drafts == want.mtp_drafts
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    # every block ran with exactly its own weights in memory: the streamer read it just before
    assert len(seen) == 12 * (tiny_args.n_layers + 1) and all(len(r) == 1 for r in seen)
    stats = streamed.streamer.stats
    assert stats.loads == len(seen)  # one read per block per forward: the stated cost


def test_streamed_verdict_captures_are_identical(tiny_ckpt):
    case = parse_case(CASE, "test")
    inp = run_inputs(case, tiny_ckpt)
    whole = capture(inp)
    streamed = capture(replace(inp, stream=True))
    assert first_difference(whole, streamed) is None
    assert len(streamed.reference.dump.records) > 500


def test_a_streamer_reading_the_wrong_layer_is_caught(tiny_ckpt, monkeypatch):
    # planted: layer 3 streams its attention from layer 1 (both CSA, same shapes); the comparison names layer 3
    real = Checkpoint.read

    def wrong(self, spec):
        return real(self, replace(spec, name=spec.name.replace("layers.3.attn.", "layers.1.attn.", 1)))

    case = parse_case({**CASE, "requests": CASE["requests"][:1]}, "test")
    inp = run_inputs(case, tiny_ckpt)
    whole = capture(inp, forced=False)
    monkeypatch.setattr(Checkpoint, "read", wrong)
    streamed = capture(replace(inp, stream=True), forced=False)
    diff = first_difference(whole, streamed)
    assert diff is not None and diff.startswith("reference: record layers.3."), diff


def test_a_streamer_that_never_releases_is_caught(tiny_ckpt, tiny_args, monkeypatch):
    # planted: blocks are read but never dropped, so the model ends up holding every layer; the resident count that
    # the first test asserts (one block at a time) must see it
    monkeypatch.setattr(stream_weights.Streamer, "release", lambda self: setattr(self, "resident", None))
    streamed, _ = build_streamed(tiny_ckpt)
    seen = []
    streamed.layers[-1].register_forward_pre_hook(lambda m, a: seen.append(_resident(streamed)))
    greedy_generate(streamed, torch.arange(8), 0, mtp=False)
    assert len(seen[0]) == tiny_args.n_layers  # not 1


def test_memory_bound_arithmetic():
    # the printed bound: the run may add two blocks' weights, the resident weights and the activations, no more
    m = StreamMemory(peak=1000 + 215 * MiB, start=1000, block=100 * MiB, block_name="layers.2", resident=10 * MiB,
                     captures=2 * MiB, buffers=1 * MiB, decoded=2 * MiB, loads=3, read_bytes=300, read_s=0.1,
                     method="VmHWM", imports=7 * MiB)  # fmt: skip
    assert m.activations == 5 * MiB and m.bound == 215 * MiB and m.within() and m.layers == 2.0
    line = m.line()
    assert "the run added 215 MiB <= bound 215 MiB = 2 x one layer's weights (100 MiB, layers.2)" in line
    assert "resident weights 10 MiB + activations 5 MiB (captures 2 MiB, buffers 1 MiB, largest GEMM" in line
    assert "decoded to float64 2 MiB): 2.00 x one layer over resident + activations" in line
    assert "(7 MiB of it the first model build's one-time imports)" in line
    m.peak += 1
    assert not m.within() and "> bound 215 MiB" in m.line() and m.to_dict()["within"] is False
    m.peak -= 60 * MiB
    assert m.within() and m.to_dict()["layers"] == pytest.approx(1.4)


def test_stream_case_keys(tmp_path, tiny_ckpt):
    case = tmp_path / "c.toml"
    case.write_text(f"""name = "real"
[model]
checkpoint = "{tiny_ckpt}"
stream = true
[[requests]]
prompt_len = 5
decode_steps = 1
""")
    c = load_case(str(case))
    assert c.stream and c.checkpoint == tiny_ckpt and c.model_args() == ModelArgs.tiny()
    assert prepare_checkpoint(c, None, tmp_path / "out") == tiny_ckpt  # the case's checkpoint, no synthetic one
    assert not (tmp_path / "out").exists()

"""Decode steps with each layer's per-token work replayed from graphs (`parity.optimized.graphs`) against the same
engine run eagerly: every step's output streams, the emitted tokens and every cache tensor, bit for bit (the same
ops on the same values in the same order; a replay only moves where the inputs and outputs live).

On CPU the pieces are `_Rerun`s (the capture-time function called again on the static buffers), so a stale input or
an aliasing mistake shows here as it would in a CUDA graph; the `gpu` test replays real CUDA graphs of the Triton
backend. The contexts straddle the compress ratios (a CSA block completes every 4 positions, an HCA block at 127)
and the window (128), so the middle's shapes change between replays of the same pieces.
"""

from dataclasses import replace

import pytest
import torch

from parity.checkpoint import build_model
from parity.errors import ParityError
from parity.optimized import graphs
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.model import OptimizedTransformer
from parity.optimized.ops import OpsConfig, resolve_ops

LENGTHS = (150, 37, 4, 124)  # the last one completes an HCA block at its fourth decode
STEPS = 7


def _bits(t: torch.Tensor) -> torch.Tensor:
    # the pools' poisoned rows are NaN: compared by their bits
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32) if t.element_size() == 4 else t


def run(model, prompts, use_graphs: bool, **engine_kw):
    """-> (the engine, each forward's output streams, each request's tokens)."""
    config = EngineConfig(max_requests=len(prompts), chunk_size=512, token_budget=1024, graphs=use_graphs)
    engine = Engine(model, replace(config, **{k: v for k, v in engine_kw.items() if k != "draft_fn"}),
                    draft_fn=engine_kw.get("draft_fn"))  # fmt: skip
    for p in prompts:
        engine.add_request(p, STEPS)
    streams, forward = [], engine._forward

    def recorded(phase, plan):
        batch, h = forward(phase, plan)
        streams.append(h.clone())
        return batch, h

    engine._forward = recorded
    outputs = engine.run()
    return engine, streams, [outputs[i].output for i in sorted(outputs)]


def cache_tensors(engine) -> dict[str, torch.Tensor]:
    c, out = engine.cache, {}
    for name in ("window", "entries", "index_entries", "state", "index_state"):
        for layer, t in enumerate(getattr(c, name)):
            if t is None:
                continue
            parts = {"": t} if isinstance(t, torch.Tensor) else {".kv": t.kv, ".score": t.score}
            out.update({f"{name}[{layer}]{k}": _bits(v) for k, v in parts.items()})
    return out


def assert_same_runs(model, prompts, forwards=STEPS, **engine_kw):
    eager = run(model, prompts, False, **engine_kw)
    graphed = run(model, prompts, True, **engine_kw)
    assert len(eager[1]) == len(graphed[1])
    assert forwards is None or len(eager[1]) == forwards  # default: the prefill (the first token), then a decode each
    for step, (a, b) in enumerate(zip(eager[1], graphed[1])):
        assert torch.equal(_bits(a), _bits(b)), f"step {step}: output streams differ"
    assert eager[2] == graphed[2]
    ca, cb = cache_tensors(eager[0]), cache_tensors(graphed[0])
    assert [k for k in ca if not torch.equal(ca[k], cb[k])] == []
    return graphed[0]


@pytest.fixture(scope="module")
def prompts(tiny_args):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, tiny_args.vocab_size, (n,), generator=g) for n in LENGTHS]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return build_model(tiny_ckpt, factory=OptimizedTransformer)[0]


def test_replayed_decode_steps_equal_eager_ones(model, prompts):
    engine = assert_same_runs(model, prompts)
    # one piece before the first layer's middle and one after each layer's, all replayed (none fell back)
    assert len(engine.graphs.pieces) == model.args.n_layers + 1


def test_planted_stale_inputs_are_caught(model, prompts, monkeypatch):
    # a replay that never copies its inputs computes every step on the capture step's values
    monkeypatch.setattr(graphs, "_same", lambda a, b: True)
    with pytest.raises(AssertionError, match="output streams differ"):
        assert_same_runs(model, prompts)


def test_no_pieces_while_a_module_has_hooks(model, prompts):
    handle = model.layers[1].attn.q.register_forward_hook(lambda m, args, out: None)
    try:
        engine = assert_same_runs(model, prompts)
    finally:
        handle.remove()
    assert engine.graphs.pieces == {}


def test_a_hook_added_between_steps_turns_the_pieces_off(model, prompts):
    engine = Engine(model, EngineConfig(max_requests=len(prompts), graphs=True, token_budget=1024, chunk_size=512))
    for p in prompts:
        engine.add_request(p, STEPS)
    for _ in range(3):  # the prefill, then two replayed decode steps
        engine.step()
    replays = lambda: sum(p.replays for p in engine.graphs.pieces.values())  # noqa: E731
    before = replays()
    assert before == 2 * (model.args.n_layers + 1)
    seen = []
    handle = model.layers[2].ffn.register_forward_hook(lambda m, args, out: seen.append(out.shape[0]))
    try:
        engine.step()
    finally:
        handle.remove()
    assert seen == [len(prompts)], "the hooked step ran through the hook"
    assert replays() == before, "the hooked step ran eagerly"  # (the CPU stand-in would run a hook in a replay)


def _wrong_every_second_draft(model):
    def drafts(request, mtp_drafts):
        return [(t + 1) % model.args.vocab_size for t in mtp_drafts] if request.drafts_proposed % 2 else mtp_drafts

    return drafts


def _verifies(seg: tuple[int, ...]) -> bool:
    return any(b - a > 1 for a, b in zip(seg, seg[1:]))  # a request with more than one token: [token, draft]


def test_mtp_verification_and_replays_are_graphed_and_equal(model, prompts):
    # with a draft per step, a step verifies [token, draft] (two tokens per request); a rejected draft's committed
    # token is replayed as a one-token step. Both run the pieces. Every second draft is made wrong.
    engine = assert_same_runs(model, prompts, forwards=None, mtp_draft=1, draft_fn=_wrong_every_second_draft(model))
    replayed = {key[2] for key, p in engine.graphs.pieces.items() if p.replays}
    assert any(_verifies(seg) for seg in replayed), "no verification step was replayed"
    assert any(not _verifies(seg) for seg in replayed), "no one-token step was replayed"


def test_segmentations_past_the_cap_run_eagerly(model, prompts, monkeypatch):
    monkeypatch.setattr(graphs.DecodeGraphs, "MAX_SHAPES", 1)
    engine = assert_same_runs(model, prompts, forwards=None, mtp_draft=1, draft_fn=_wrong_every_second_draft(model))
    assert len(engine.graphs.step_inputs) == 1 and len({key[2] for key in engine.graphs.pieces}) == 1


@pytest.mark.gpu
def test_cuda_graphs_of_the_triton_backend_equal_eager_steps(tiny_ckpt, prompts):
    ops = resolve_ops(OpsConfig(default="triton"))
    model, _ = build_model(tiny_ckpt, device="cuda", factory=lambda a: OptimizedTransformer(a, ops))
    engine = assert_same_runs(model, [p.cuda() for p in prompts])
    assert len(engine.graphs.pieces) == model.args.n_layers + 1  # every piece captured (a failure raises)
    # MTP: verification chunks and the replays after rejected drafts, captured and replayed as real graphs
    draft_fn = _wrong_every_second_draft(model)
    engine = assert_same_runs(model, [p.cuda() for p in prompts], forwards=None, mtp_draft=1, draft_fn=draft_fn)
    replayed = {key[2] for key, p in engine.graphs.pieces.items() if p.replays}
    assert any(_verifies(seg) for seg in replayed) and any(not _verifies(seg) for seg in replayed)


def test_a_piece_that_cannot_be_captured_stops_the_run(model, prompts, monkeypatch):
    # what a CUDA capture of an op that copies a host tensor raises; the run must stop, not go on eagerly
    def refuse(self, fn, inputs):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    monkeypatch.setattr(graphs._Rerun, "__init__", refuse)
    engine = Engine(model, EngineConfig(max_requests=1, graphs=True))
    engine.add_request(prompts[1], 3)
    with pytest.raises(ParityError, match="layer 0's per-token ops cannot be captured in a CUDA graph"):
        engine.run()

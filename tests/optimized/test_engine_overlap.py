"""`EngineConfig.overlap`: a step's greedy tokens stay on the device, the next step's batch takes them from there and
the host reads them one step later. The outputs and logits must be bit for bit those of the engine that reads every
step's tokens before the next one, whatever the schedule: requests of different prompt and output lengths in 2
slots (slots reused, admissions while others decode), chunked prefills mixed with decodes, a teacher-forced request,
and decode graphs (run eagerly on the CPU)."""

import pytest
import torch

from parity.checkpoint import build_model
from parity.errors import ParityError
from parity.optimized import model as opt_model
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.ops import OpsConfig, resolve_ops

# (prompt length, new tokens): lengths straddle the compress ratios (4, 128) and the window (128)
REQUESTS = ((150, 3), (37, 6), (4, 1), (131, 4), (90, 5))
FORCED = 1  # this request emits given tokens (teacher forcing)


def run(ckpt, vocab: int, overlap: bool, graphs: bool = False, seen=None, device="cpu", ops=None) -> dict:
    model, _ = build_model(ckpt, device=device, factory=lambda a: opt_model.OptimizedTransformer(a, ops))
    config = EngineConfig(max_requests=2, chunk_size=48, token_budget=96, graphs=graphs, overlap=overlap)
    engine = Engine(model, config)
    g = torch.Generator().manual_seed(0)
    for i, (n, new) in enumerate(REQUESTS):
        forced = torch.randint(0, vocab, (new,), generator=g).tolist() if i == FORCED else None
        engine.add_request(torch.randint(0, vocab, (n,), generator=g), new, forced=forced)
    while engine.step():
        if seen is not None:  # what the host holds of each request between steps: (finished, output)
            seen.extend(
                (req.id in engine.finished, list(req.output)) for req in [*engine.running, *engine.finished.values()]
            )
    return engine.finished


@pytest.mark.parametrize("graphs", [False, True])
def test_overlap_gives_the_same_tokens_and_logits(tiny_ckpt, tiny_args, graphs):
    want = run(tiny_ckpt, tiny_args.vocab_size, overlap=False, graphs=graphs)
    seen = []
    got = run(tiny_ckpt, tiny_args.vocab_size, overlap=True, graphs=graphs, seen=seen)
    assert got.keys() == want.keys() == set(range(len(REQUESTS)))
    for i, req in want.items():
        assert got[i].output == req.output and len(req.output) == REQUESTS[i][1]
        assert len(got[i].logits) == len(req.logits)
        assert all(torch.equal(a, b) for a, b in zip(got[i].logits, req.logits)), i
    # the host really ran a step ahead: a request's newest token was unread (None) after some steps, also a finished
    # one's (a finishing step does not wait for the GPU either), and never an older one
    assert any(out and out[-1] is None for _, out in seen)
    assert all(None not in out[:-1] for _, out in seen)
    assert any(finished and out[-1] is None for finished, out in seen)


@pytest.mark.gpu
def test_overlap_on_cuda_with_graphs_and_the_triton_backend(tiny_ckpt, tiny_args):
    """On a GPU the host reads a step's tokens from a copy issued behind it (`Unread.issue`): the same outputs and
    logits as the reading engine, with CUDA graphs and the Triton kernels."""
    ops = resolve_ops(OpsConfig(default="triton"))
    kw = dict(graphs=True, device="cuda", ops=ops)
    want = run(tiny_ckpt, tiny_args.vocab_size, overlap=False, **kw)
    got = run(tiny_ckpt, tiny_args.vocab_size, overlap=True, **kw)
    for i, req in want.items():
        assert got[i].output == req.output
        assert all(torch.equal(a, b) for a, b in zip(got[i].logits, req.logits)), i


def test_tokens_fed_from_the_device_matter(tiny_ckpt, tiny_args, monkeypatch):
    """The comparison above can fail: without the copy from the device, the unread tokens go in as 0."""
    want = run(tiny_ckpt, tiny_args.vocab_size, overlap=False)
    monkeypatch.setattr(Engine, "_feed_unread", lambda self, plan, batch: None)
    got = run(tiny_ckpt, tiny_args.vocab_size, overlap=True)
    assert any(got[i].output != want[i].output for i in want if i != FORCED)


def test_overlap_refuses_mtp_drafts(tiny_ckpt):
    model, _ = build_model(tiny_ckpt, factory=lambda a: opt_model.OptimizedTransformer(a))
    with pytest.raises(ParityError, match="overlap"):
        Engine(model, EngineConfig(overlap=True, mtp_draft=1))

"""The optimized engine against solo reference runs, at every site and position (`parity.capture` +
`parity.compare.verdict`, the same capture and judge as `parity run`).

Tolerances, and why:
- bitwise wherever the two sides run the same ops at the same shapes: every request's prefill in one chunk plus its
  decodes, in a mixed batch, with the torch backend (per-request shapes for the shape-sensitive ops,
  row-independent GEMMs); and chunked prefill / MTP verification in `decode_exact_chunks` mode against the
  reference run with the same prefill/decode split — judged with the decode-exact noise model (zero everywhere);
- with batched ops in chunks, the teacher-forced own error of every site stays within the default noise model
  (`compare.thresholds`, each default stated with its reason), while the chained run drifts further.
"""

import pytest
import torch

from parity.capture import runs
from parity.compare.rows import RowStore
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import judge_run
from parity.optimized.cache import CompressorState, PagedCache
from parity.optimized.engine import EngineConfig
from parity.optimized.model import OptAttention
from parity.run import capture

# lengths straddle the compress ratios (4, 128) and the window (128)
LENGTHS = (150, 37, 4, 131)
DECODE = 8
EXACT = NoiseModel(exact=True)


@pytest.fixture(scope="module")
def prompts(tiny_args):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, tiny_args.vocab_size, (n,), generator=g) for n in LENGTHS]


def inputs(ckpt, prompts, config, **kw) -> runs.RunInputs:
    return runs.RunInputs(ckpt, tuple(prompts), (DECODE,) * len(prompts), config, **kw)


def chained_verdict(c, noise=EXACT):
    return judge_run(c.reference.dump, c.chained.dump, c.layout, c.n_layers, noise)


def assert_passed(v):
    assert v.passed, v.location()
    sites = {r.path for r in v.results if r.compared}
    assert len(sites) >= 4 * 12, "every site of every layer was compared"
    assert v.missing_rows == 0


def test_mixed_batch_matches_solo_reference_bitwise(tiny_ckpt, prompts):
    c = capture(inputs(tiny_ckpt, prompts, EngineConfig(chunk_size=512, token_budget=1024)), forced=False)
    assert_passed(chained_verdict(c))
    for i, gen in enumerate(c.targets.generations):
        assert c.chained.requests[i].output == gen.tokens


# chunk sizes on and off the ratios (4, 128) and the window: every request's prompt is split, and decodes of the
# requests that finished their prompt run in the same batches as other requests' prompt chunks
CHUNKS = [
    pytest.param(64, 100, id="chunk64"),
    pytest.param(50, 90, id="chunk50"),
    pytest.param(129, 200, id="chunk129"),
]


@pytest.mark.parametrize(("chunk", "budget"), CHUNKS)
def test_chunked_prefill_is_the_decode_path_exactly(tiny_ckpt, prompts, chunk, budget):
    config = EngineConfig(chunk_size=chunk, token_budget=budget, decode_exact_chunks=True)
    c = capture(inputs(tiny_ckpt, prompts, config), forced=False)
    assert_passed(chained_verdict(c))
    assert any(r.first_chunk < len(r.prompt) for r in c.chained.requests.values())


def test_chunked_prefill_default_ops_own_error_within_the_default_noise_model(tiny_ckpt, prompts):
    """Batched ops in chunks after a context vs the reference's one-token decodes: teacher-forced, every site stays
    within the stated defaults; chained, the last-bit differences are amplified layer after layer (this random
    model is chaotic) and no fixed bound separates them from bugs — which is why the verdict is teacher-forced."""
    c = capture(inputs(tiny_ckpt, prompts, EngineConfig(chunk_size=64, token_budget=100)))
    forced = judge_run(c.reference.dump, c.forced.dump, c.layout, c.n_layers, NoiseModel())
    assert_passed(forced)
    assert not all(r.bitwise for r in forced.results), "batched ops are not bitwise (else this tests nothing)"
    chained = chained_verdict(c, NoiseModel())
    worst = lambda v: max(r.max_err for r in v.results if r.compared)  # noqa: E731
    assert worst(chained) > worst(forced)
    # requests whose prompt fit one chunk stay bitwise (against the reference on the same schedule) even in batches
    # with chunked neighbours
    bitwise = [
        all(torch.equal(a, b) for a, b in zip(c.chained.requests[i].logits, c.reference.generations[i].logits))
        for i in range(len(prompts))
    ]
    assert bitwise == [len(p) <= 64 for p in prompts]


def _planted_drafts(request, mtp_drafts):
    """Force every verify outcome, cycling over the verification rounds: the first draft wrong (accept 0), the
    second wrong (accept 1), ..., all right (accept k)."""
    n, k = len(request.output), len(mtp_drafts)
    right = [request.forced[min(n + j, len(request.forced) - 1)] for j in range(k)]
    wrong_at = (request.drafts_proposed // k) % (k + 1)  # == k: all right
    return [t if j < wrong_at else (t + 1) % 1024 for j, t in enumerate(right)]


@pytest.mark.parametrize(
    ("chunk", "budget", "k"),
    [
        pytest.param(512, 1024, 1, id="prefill-k1"),
        pytest.param(48, 90, 1, id="chunk48-k1"),
        pytest.param(48, 90, 3, id="chunk48-k3"),
    ],
)
def test_mtp_accept_reject_and_rollback_exact(tiny_ckpt, prompts, chunk, budget, k):
    config = EngineConfig(chunk_size=chunk, token_budget=budget, mtp_draft=k, decode_exact_chunks=True)
    inp = inputs(tiny_ckpt, prompts, config)
    tg = runs.targets(inp)
    chained = runs.engine_capture(inp, tg, draft_fn=_planted_drafts)
    ref = runs.reference_capture(inp, tg, chained.first_chunks())
    layout = {str(i): _layout(p, chained.requests[i]) for i, p in enumerate(prompts)}
    v = judge_run(ref.dump, chained.dump, layout, inp.args().n_layers, EXACT)
    assert_passed(v)
    assert any(r.path.startswith("mtp.") and r.compared for r in v.results)
    for req in chained.requests.values():
        assert 0 < req.drafts_accepted < req.drafts_proposed


def _layout(prompt, req):
    from parity.compare.verdict import RequestLayout

    return RequestLayout(len(prompt), req.first_chunk)


def test_mtp_drafts_match_the_reference_mtp(tiny_ckpt, prompts):
    """The engine's MTP block drafts exactly what the reference MTP block drafts at every step (here all drafts
    are rejected on this random model, so every verify is rolled back and replayed)."""
    config = EngineConfig(chunk_size=512, token_budget=1024, mtp_draft=1, decode_exact_chunks=True)
    c = capture(inputs(tiny_ckpt, prompts, config), forced=False)
    assert_passed(chained_verdict(c))
    for i, gen in enumerate(c.targets.generations):
        req = c.chained.requests[i]
        assert req.drafts_proposed == DECODE
        assert req.mtp_drafts[:DECODE] == gen.mtp_drafts[:DECODE]


def test_same_request_in_slot_0_and_slot_3_is_bitwise_equal(tiny_ckpt, prompts):
    """Slot invariance with chunking and MTP on: each request admitted first (slot 0) or last (slot 3), next to
    different batchmates, gives the same tokens, logits and activations at every site bit for bit. The budget fits
    every chunk of a step, so each request gets the same chunks in both orders (a different split is a different
    computation, not a slot effect)."""
    config = EngineConfig(chunk_size=48, token_budget=1024, mtp_draft=1)
    first = inputs(tiny_ckpt, prompts, config)
    tg = runs.targets(first)
    caps = [runs.engine_capture(inputs(tiny_ckpt, prompts, config, order=o), tg) for o in ([0, 1, 2, 3], [3, 2, 1, 0])]
    assert (caps[0].requests[0].admitted_slot, caps[1].requests[0].admitted_slot) == (0, 3)
    assert caps[0].first_chunks() == caps[1].first_chunks()
    n_layers = first.args().n_layers
    stores = [RowStore.from_dump(c.dump, n_layers) for c in caps]
    assert stores[0].rows.keys() == stores[1].rows.keys()
    for key, rows in stores[0].rows.items():
        other = stores[1].rows[key]
        assert rows.keys() == other.keys(), key
        assert all(torch.equal(v, other[k]) for k, v in rows.items()), key
    for i in range(len(prompts)):
        a, b = caps[0].requests[i], caps[1].requests[i]
        assert a.output == b.output and all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


# ---- planted bugs: each breaks one piece of the paged/ring/state bookkeeping, and the bitwise verdict must fail


def _wrong_block_stride(self, table, entries):
    bs = self.block_size
    return table.long()[entries // bs] * (bs - 1) + entries % bs


def _ring_write_off_by_one(self, kv, batch, cache, ring):
    flat = ring.view(-1, self.head_dim)
    for i in range(batch.num_seqs):
        rows, start, n = batch.rows(i), batch.start_pos[i], batch.seq_len(i)
        keep = min(n, self.window_size)
        pos = torch.arange(start + n - keep, start + n) + 1
        flat[cache.ring_rows(batch.slots[i], pos)] = kv[rows][n - keep :]


def _state_of_slot_zero(self, slot):
    return self.kv[0:1], self.score[0:1]


@pytest.mark.parametrize(
    ("target", "attr", "bug"),
    [
        pytest.param(PagedCache, "entry_rows", _wrong_block_stride, id="block-table-offset"),
        pytest.param(OptAttention, "_write_ring", _ring_write_off_by_one, id="window-ring-index"),
        pytest.param(CompressorState, "rows", _state_of_slot_zero, id="state-slot"),
    ],
)
def test_planted_bookkeeping_bug_is_caught(tiny_ckpt, prompts, monkeypatch, target, attr, bug):
    monkeypatch.setattr(target, attr, bug)
    config = EngineConfig(chunk_size=64, token_budget=100, decode_exact_chunks=True)
    c = capture(inputs(tiny_ckpt, prompts, config), forced=False)
    assert not chained_verdict(c).passed

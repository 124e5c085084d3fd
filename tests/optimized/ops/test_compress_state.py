"""compress_state: one decode token of each of D requests into its compressor state; the blocks they complete.

Twin: `parity.reference.model.Compressor.decode_block`, called once per request on that request's state rows (the
reference's own compressors of the tiny model: ratio 4 with the overlap, 128 without). Every backend claims bit for
bit equality (copies and the twin's one fp32 addition): the blocks and both state tensors after the step, compared
by their bits (the state of a released slot is NaN). Awkward cases: one request, requests whose tokens all or none
complete a block, token rows picked out of order (an MTP verify step's second token), scattered slots, the
projection row stride of a wider tensor.
"""

import pytest
import torch

from parity.optimized.ops.triton import compress_state as tri

OP = "compress_state"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def compressor(ref_model, ratio):
    comp = ref_model.layers[1 if ratio == 4 else 2].attn.compressor
    assert comp.compress_ratio == ratio
    return comp


def make_case(comp, positions, n_slots=9, rows_out_of_order=False, seed=0):
    """Projections of T tokens, each request's position and slot, a state with NaN-poisoned free slots."""
    g = torch.Generator().manual_seed(seed)
    ratio, coff, d = comp.compress_ratio, 1 + comp.overlap, comp.head_dim
    n = len(positions)
    t = n + 2 if rows_out_of_order else n
    wide = torch.randn(t, coff * d + 16, generator=g)  # a row stride wider than the projection
    kv, score = wide[:, : coff * d], torch.randn(t, coff * d, generator=g)
    rows = torch.randperm(t, generator=g)[:n] if rows_out_of_order else None
    slots = torch.randperm(n_slots, generator=g)[:n]
    state_kv = torch.full((n_slots, coff * ratio, coff * d), float("nan"))
    state_score = torch.full_like(state_kv, float("nan"))
    state_kv[slots] = torch.randn(n, coff * ratio, coff * d, generator=g)
    state_score[slots] = torch.randn(n, coff * ratio, coff * d, generator=g)
    return kv, score, rows, torch.tensor(positions), slots, state_kv, state_score


def twin(comp, kv, score, rows, positions, slots, state_kv, state_score):
    """The reference decode_block per request, in request order; -> (blocks or None, states after)."""
    state_kv, state_score = state_kv.clone(), state_score.clone()
    out = []
    for i, (pos, slot) in enumerate(zip(positions.tolist(), slots.tolist())):
        r = i if rows is None else int(rows[i])
        block = comp.decode_block(
            kv[r : r + 1], score[r : r + 1], pos, state_kv[slot : slot + 1], state_score[slot : slot + 1]
        )
        if block is not None:
            out.append(tuple(b.clone() for b in block))  # without overlap the block is the state itself
    blocks = (torch.cat([b[0] for b in out]), torch.cat([b[1] for b in out])) if out else None
    return blocks, state_kv, state_score


def call(fn, comp, kv, score, rows, positions, slots, state_kv, state_score, device):
    ratio = comp.compress_ratio
    done = [s for p, s in zip(positions.tolist(), slots.tolist()) if (p + 1) % ratio == 0]
    state_kv, state_score = state_kv.clone().to(device), state_score.clone().to(device)
    blocks = fn(
        kv.to(device),
        score.to(device),
        comp.ape.detach().to(device),
        None if rows is None else rows.to(device),
        (positions % ratio).to(device),
        slots.to(device),
        torch.tensor(done, device=device) if done else None,
        state_kv,
        state_score,
        comp.overlap,
    )
    blocks = None if blocks is None else tuple(b.cpu() for b in blocks)
    return blocks, state_kv.cpu(), state_score.cpu()


def assert_same(got, want):
    (gb, gk, gs), (wb, wk, ws) = got, want
    assert (gb is None) == (wb is None)
    if wb is not None:
        assert gb[0].shape == wb[0].shape
        assert torch.equal(bits(gb[0]), bits(wb[0])) and torch.equal(bits(gb[1]), bits(wb[1])), "blocks differ"
    assert torch.equal(bits(gk), bits(wk)), "kv state differs"
    assert torch.equal(bits(gs), bits(ws)), "score state differs"


CASES = [
    pytest.param(4, [3], False, id="r4-one-completes"),
    pytest.param(4, [5], False, id="r4-one-none"),
    pytest.param(4, [3, 7, 11], False, id="r4-all-complete"),
    pytest.param(4, [4, 9, 18, 3, 130, 255, 6], False, id="r4-mixed"),
    pytest.param(4, [127, 6, 3], True, id="r4-rows-out-of-order"),
    pytest.param(128, [127], False, id="r128-completes"),
    pytest.param(128, [5, 127, 254, 255, 130], False, id="r128-mixed"),
    pytest.param(128, [200, 383], True, id="r128-rows-out-of-order"),
]


@pytest.mark.parametrize(("ratio", "positions", "out_of_order"), CASES)
def test_equals_the_reference_decode_block_per_request(impl, ref_model, ratio, positions, out_of_order):
    comp = compressor(ref_model, ratio)
    case = make_case(comp, positions, rows_out_of_order=out_of_order)
    device = "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"
    assert_same(call(impl, comp, *case, device), twin(comp, *case))


@pytest.mark.parametrize(("ratio", "plant"), [(4, 1), (4, 2)])
def test_triton_planted_bugs_are_caught(ref_model, ratio, plant):
    # 1: the completed block is not shifted into the previous one; 2: the overlap's new row lands in the previous
    # block's half
    comp = compressor(ref_model, ratio)
    case = make_case(comp, [4, 9, 18, 3, 130, 255, 6])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def planted(*args):
        return tri.launch(*args, plant=plant)

    with pytest.raises(AssertionError, match="differ"):
        assert_same(call(planted, comp, *case, device), twin(comp, *case))

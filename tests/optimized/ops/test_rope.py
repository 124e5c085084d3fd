"""rope: interleaved RoPE in place on a bf16 view, one rotation per token from its own position.

Twin: `parity.reference.model.apply_rotary_emb`, which rotates one request's `[1, s, r]` / `[1, s, h, r]` view with
the table rows `freqs_cis[start_pos : start_pos + s]` (queries, window KV, the inverse on the attention output), or
with `freqs_cis[:cutoff:ratio]` / `freqs_cis[start_pos + 1 - ratio]` (compressor entries in prefill / decode). The
op gets the flat `[T, ...]` view and each token's table row (`freqs_cis[batch.positions]`).
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.reference import model as ref

OPS = resolve_ops()
RD = 64

# (start positions, lengths) of the sequences, heads (None: the 2-D KV [T, d]), head dim; tables of layer 0 (SWA,
# no YaRN) and layer 1 (compressed, YaRN)
CASES = [
    ((0,), (1,), 4, 128),
    ((5,), (2,), None, 128),
    ((0,), (5,), 3, 128),
    ((127,), (37,), None, 128),
    ((0,), (63,), 4, 64),
    ((3,), (129,), 4, 128),
    ((0, 7, 130), (37, 1, 2), 4, 128),
    ((0, 0, 300), (1, 63, 5), None, 128),
    ((64, 1, 0, 9, 450), (3, 1, 5, 2, 1), 1, 128),
]
PARAMS = [
    pytest.param(*c, id="S{}-L{}-H{}-D{}".format("_".join(map(str, c[0])), "_".join(map(str, c[1])), *c[2:]))
    for c in CASES
]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def make(t, h, d):
    return torch.randn((t, d) if h is None else (t, h, d)).to(torch.bfloat16)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize(("starts", "lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, starts, lengths, h, d, layer, inverse):
    freqs_cis = ref_model.layers[layer].attn.freqs_cis
    cu = cu_of(lengths)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
    x = make(cu[-1], h, d)
    expected = x.clone()
    for s, a, b in zip(starts, cu[:-1], cu[1:]):
        ref.apply_rotary_emb(expected[None, a:b][..., -RD:], freqs_cis[s : s + b - a], inverse)
    view = x[..., -RD:]
    out = OPS.rope(view, freqs_cis[positions], inverse)
    assert out.data_ptr() == view.data_ptr()  # in place, through the strided view
    assert torch.equal(x, expected)


@pytest.mark.parametrize(("n_entries", "ratio"), [(1, 4), (9, 4), (37, 4), (3, 128)])
def test_compressor_entries_prefill_and_decode(ref_model, n_entries, ratio):
    # prefill: entry j at position j * ratio (reference: freqs_cis[:cutoff:ratio]); decode: the entry completed by
    # the token at start_pos, at position start_pos + 1 - ratio
    freqs_cis = ref_model.layers[1].attn.freqs_cis
    entries = make(n_entries, None, 128)
    expected = entries.clone()
    ref.apply_rotary_emb(expected[None][..., -RD:], freqs_cis[: n_entries * ratio : ratio])
    OPS.rope(entries[..., -RD:], freqs_cis[torch.arange(n_entries) * ratio])
    assert torch.equal(entries, expected)

    start_pos = n_entries * ratio + ratio - 1
    entry = make(1, None, 128)
    expected = entry.clone()
    ref.apply_rotary_emb(expected[None][..., -RD:], freqs_cis[start_pos + 1 - ratio].unsqueeze(0))
    OPS.rope(entry[..., -RD:], freqs_cis[torch.tensor([start_pos // ratio * ratio])])
    assert torch.equal(entry, expected)


def test_rows_do_not_depend_on_batchmates_or_position(ref_model):
    freqs_cis = ref_model.layers[1].attn.freqs_cis
    a, pos = make(37, 4, 128), torch.arange(100, 137)
    alone = a.clone()
    OPS.rope(alone[..., -RD:], freqs_cis[pos])
    for before, after in ((5, 1), (0, 63), (129, 0)):
        x = torch.cat([make(before, 4, 128), a, make(after, 4, 128)])
        p = torch.cat([torch.arange(before), pos, torch.arange(7, 7 + after)])
        OPS.rope(x[..., -RD:], freqs_cis[p])
        assert torch.equal(x[before : before + 37], alone)


def test_planted_bug_batch_positions_are_caught(ref_model):
    # a backend that rotates the flat batch by row index (positions 0..T-1) instead of each token's own position
    freqs_cis = ref_model.layers[0].attn.freqs_cis
    starts, lengths = (0, 7, 130), (37, 1, 2)
    cu = cu_of(lengths)
    x = make(cu[-1], 4, 128)
    expected = x.clone()
    for s, a, b in zip(starts, cu[:-1], cu[1:]):
        ref.apply_rotary_emb(expected[None, a:b][..., -RD:], freqs_cis[s : s + b - a])
    OPS.rope(x[..., -RD:], freqs_cis[: cu[-1]])
    assert not torch.equal(x, expected)

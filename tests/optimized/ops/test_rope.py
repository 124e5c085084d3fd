"""rope: interleaved RoPE in place on a bf16 view, one rotation per token from its own position.

Twin: `parity.reference.model.apply_rotary_emb`, which rotates one request's `[1, s, r]` / `[1, s, h, r]` view with
the table rows `freqs_cis[start_pos : start_pos + s]` (queries, window KV, the inverse on the attention output), or
with `freqs_cis[:cutoff:ratio]` / `freqs_cis[start_pos + 1 - ratio]` (compressor entries in prefill / decode). The
op gets the flat `[T, ...]` view and each token's table row (`freqs_cis[batch.positions]`).

Every backend claims bit equality: the triton kernel rounds the complex product the way the twin's device does
(FMAs on CUDA, separate products on CPU; see its module docstring).
"""

import itertools

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from parity.reference import model as ref
from tests.optimized.ops.conftest import BackendImpl, check

OP = "rope"
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


def make(t, h, d, dev="cpu"):
    return torch.randn((t, d) if h is None else (t, h, d)).to(torch.bfloat16).to(dev)


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def table(ref_model, layer, dev):
    # the twin's table, used as is on every device (the twin and the op rotate by the same numbers)
    return ref_model.layers[layer].attn.freqs_cis.to(dev)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize(("starts", "lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, starts, lengths, h, d, layer, inverse):
    dev = device_of(impl)
    freqs_cis = table(ref_model, layer, dev)
    cu = cu_of(lengths)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)]).to(dev)
    x = make(cu[-1], h, d, dev)
    expected = x.clone()
    for s, a, b in zip(starts, cu[:-1], cu[1:]):
        ref.apply_rotary_emb(expected[None, a:b][..., -RD:], freqs_cis[s : s + b - a], inverse)
    view = x[..., -RD:]
    out = impl(view, freqs_cis[positions], inverse)
    assert out.data_ptr() == view.data_ptr()  # in place, through the strided view
    check(impl, x, expected)


@pytest.mark.parametrize(("n_entries", "ratio"), [(1, 4), (9, 4), (37, 4), (3, 128)])
def test_compressor_entries_prefill_and_decode(impl, ref_model, n_entries, ratio):
    # prefill: entry j at position j * ratio (reference: freqs_cis[:cutoff:ratio]); decode: the entry completed by
    # the token at start_pos, at position start_pos + 1 - ratio
    dev = device_of(impl)
    freqs_cis = table(ref_model, 1, dev)
    entries = make(n_entries, None, 128, dev)
    expected = entries.clone()
    ref.apply_rotary_emb(expected[None][..., -RD:], freqs_cis[: n_entries * ratio : ratio])
    impl(entries[..., -RD:], freqs_cis[torch.arange(n_entries, device=dev) * ratio])
    check(impl, entries, expected)

    start_pos = n_entries * ratio + ratio - 1
    entry = make(1, None, 128, dev)
    expected = entry.clone()
    ref.apply_rotary_emb(expected[None][..., -RD:], freqs_cis[start_pos + 1 - ratio].unsqueeze(0))
    impl(entry[..., -RD:], freqs_cis[torch.tensor([start_pos // ratio * ratio], device=dev)])
    check(impl, entry, expected)


def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model):
    dev = device_of(impl)
    freqs_cis = table(ref_model, 1, dev)
    a, pos = make(37, 4, 128, dev), torch.arange(100, 137)
    alone = a.clone()
    impl(alone[..., -RD:], freqs_cis[pos.to(dev)])
    for before, after in ((5, 1), (0, 63), (129, 0), (300, 2)):
        x = torch.cat([make(before, 4, 128, dev), a, make(after, 4, 128, dev)])
        p = torch.cat([torch.arange(before), pos, torch.arange(7, 7 + after)]).to(dev)
        impl(x[..., -RD:], freqs_cis[p])
        assert torch.equal(x[before : before + 37], alone)


def test_planted_bug_batch_positions_are_caught(impl, ref_model):
    # a backend that rotates the flat batch by row index (positions 0..T-1) instead of each token's own position
    dev = device_of(impl)
    freqs_cis = table(ref_model, 0, dev)
    starts, lengths = (0, 7, 130), (37, 1, 2)
    cu = cu_of(lengths)
    x = make(cu[-1], 4, 128, dev)
    expected = x.clone()
    for s, a, b in zip(starts, cu[:-1], cu[1:]):
        ref.apply_rotary_emb(expected[None, a:b][..., -RD:], freqs_cis[s : s + b - a])
    impl(x[..., -RD:], freqs_cis[: cu[-1]])
    assert not torch.equal(x, expected)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_planted_bug_non_interleaved_pairs_are_caught(ref_model, inverse):
    # the triton kernel rotating pairs (i, i + 32) (the "rotate half" layout) instead of (2i, 2i + 1)
    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    tri = BackendImpl(OP, "triton", registry()[OP]["triton"], ops.rope)
    from parity.optimized.ops.triton import rope as module

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    freqs_cis = table(ref_model, 1, dev)
    x = make(63, 4, 128, dev)
    expected = x.clone()
    ref.apply_rotary_emb(expected[None][..., -RD:], freqs_cis[5:68], inverse)
    got = x.clone()
    module.launch(got[..., -RD:], freqs_cis[5:68], inverse)
    check(tri, got, expected)
    module.launch(x[..., -RD:], freqs_cis[5:68], inverse, plant=1)
    with pytest.raises(AssertionError):
        check(tri, x, expected)

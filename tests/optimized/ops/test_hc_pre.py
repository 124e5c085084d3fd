"""hc_pre: mHC pre-mix, the hc residual streams of every token collapsed into one sublayer input.

Twin: `parity.reference.model.Block.hc_pre` on one request's `[1, s, hc, D]` streams -> y `[1, s, D]` bf16, post
`[1, s, hc]` and comb `[1, s, hc, hc]` fp32. The op runs the flat `[T, hc, D]` batch with the fp32 mixer GEMM per
segment (see dense_linear); the planted-bug test shows that one segment for the batch changes post/comb.
"""

import copy
import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from tests.optimized.ops.conftest import DEVICES, skip_unless_batch_changes_bits

OPS = resolve_ops()

CASES = [
    ((1,), 0, "attn"),
    ((2,), 2, "ffn"),
    ((5,), 1, "attn"),
    ((37,), 3, "ffn"),
    ((63,), 0, "ffn"),
    ((129,), 2, "attn"),
    ((1, 2, 5), 1, "ffn"),
    ((37, 1, 63), 3, "attn"),
    ((1, 1, 1, 1, 1), 2, "attn"),
    ((2, 5, 1, 3, 1), 0, "attn"),
]
PARAMS = [pytest.param(*c, id="L{}-layer{}-{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def streams(t, hc=4, d=256):
    return torch.randn(t, hc, d).to(torch.bfloat16)


def mixer(block, which):
    return tuple(getattr(block, f"hc_{which}_{p}") for p in ("fn", "scale", "base"))


def run(block, which, x, cu):
    fn, scale, base = mixer(block, which)
    return OPS.hc_pre(x, fn, scale, base, cu, block.norm_eps, block.hc_mult, block.hc_sinkhorn_iters, block.hc_eps)


def reference_per_sequence(block, which, x, cu):
    outs = [block.hc_pre(x[None, a:b], *mixer(block, which)) for a, b in zip(cu[:-1], cu[1:])]
    return tuple(torch.cat([o[i][0] for o in outs]) for i in range(3))


@pytest.mark.parametrize(("lengths", "layer", "which"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, layer, which):
    block = ref_model.layers[layer]
    cu = cu_of(lengths)
    x = streams(cu[-1])
    y, post, comb = run(block, which, x, cu)
    ry, rpost, rcomb = reference_per_sequence(block, which, x, cu)
    assert (y.dtype, post.dtype, comb.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert y.shape == (cu[-1], 256) and post.shape == (cu[-1], 4) and comb.shape == (cu[-1], 4, 4)
    assert torch.equal(y, ry)
    assert torch.equal(post, rpost)
    assert torch.equal(comb, rcomb)


def test_mtp_block_mixer(ref_model):
    block = ref_model.mtp[0]
    cu = cu_of((5, 1, 37))
    x = streams(cu[-1])
    for got, want in zip(run(block, "attn", x, cu), reference_per_sequence(block, "attn", x, cu)):
        assert torch.equal(got, want)


def test_segments_do_not_depend_on_batchmates_or_position(ref_model):
    block = ref_model.layers[2]
    a = streams(37)
    alone = run(block, "attn", a, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        x = torch.cat([streams(before), a, streams(after)])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        for got, want in zip(run(block, "attn", x, cu), alone):
            assert torch.equal(got[before : before + 37], want)


# the fp32 mixer GEMM over the whole batch changes mixes, hence post/comb, where the machine's BLAS rounds by row
# count (y survives the bf16 cast in these cases, so only "some output differs" is asserted); measured per case
BREAKS = [
    pytest.param((1, 5), id="L1_5"),
    pytest.param((2, 3), id="L2_3"),
    pytest.param((37, 1, 63), id="L37_1_63"),
    pytest.param((1, 1, 1, 1), id="L1_1_1_1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", BREAKS)
def test_planted_bug_one_segment_for_the_batch_is_not_bitwise(ref_model, lengths, device):
    block = copy.deepcopy(ref_model.layers[2]).to(device)
    cu = cu_of(lengths)
    x = streams(cu[-1]).to(device)
    expected = reference_per_sequence(block, "attn", x, cu)
    assert all(torch.equal(g, w) for g, w in zip(run(block, "attn", x, cu), expected))
    whole = reference_per_sequence(block, "attn", x, (0, cu[-1]))
    skip_unless_batch_changes_bits(
        torch.cat([t.flatten() for t in expected]), torch.cat([t.flatten() for t in whole]), "hc_pre"
    )
    assert not all(torch.equal(g, w) for g, w in zip(run(block, "attn", x, (0, cu[-1])), expected))

"""dense_linear: unquantized (fp32 or bf16 weight) linear over ragged tokens, one F.linear per op segment.

Twin: the `F.linear` calls of `parity.reference.model` (hc mixers, compressor wkv/wgate, indexer weights_proj,
gate), each made on one request's `[1, s, K]` tokens. The op docstring: BLAS sums K in another order for one or
two rows (gemv) than for more (gemm), so the torch backend calls F.linear per segment; the planted-bug test shows
that one call for the whole batch is not bitwise wherever the machine's BLAS rounds by row count, which is why the
op segments.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from parity.optimized.ops import resolve_ops
from tests.optimized.ops.conftest import DEVICES, skip_unless_batch_changes_bits

OPS = resolve_ops()

# (N, K, weight dtype) of the model's dense linears at tiny sizes (hc_mult 4, dim 256, head_dim 128, 4 index heads)
SHAPES = {
    "hc_pre-fp32": (24, 1024, torch.float32),  # hc_attn_fn / hc_ffn_fn, (2 + hc) * hc mixes
    "hc_head-fp32": (4, 1024, torch.float32),  # hc_head_fn
    "compressor-fp32": (256, 256, torch.float32),  # overlapped wkv / wgate: 2 * head_dim
    "weights_proj-bf16": (4, 256, torch.bfloat16),  # indexer weights_proj
    "gate-fp32": (8, 256, torch.float32),  # Gate: F.linear(x.float(), weight.float())
}
CASES = [
    ((1,), "hc_pre-fp32"),
    ((2,), "compressor-fp32"),
    ((5,), "weights_proj-bf16"),
    ((37,), "hc_head-fp32"),
    ((63,), "gate-fp32"),
    ((129,), "compressor-fp32"),
    ((1, 2, 5), "hc_pre-fp32"),
    ((37, 1, 63), "compressor-fp32"),
    ((2, 3), "hc_head-fp32"),
    ((1, 5, 2, 1, 3), "gate-fp32"),
    ((37, 1, 63), "weights_proj-bf16"),
    ((1, 1, 1, 1, 1, 1, 1), "hc_pre-fp32"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def operands(name, t):
    n, k, dtype = SHAPES[name]
    return torch.randn(t, k).to(dtype), (torch.randn(n, k) * k**-0.5).to(dtype)


def reference_per_sequence(x, w, cu):
    return torch.cat([F.linear(x[None, a:b], w)[0] for a, b in zip(cu[:-1], cu[1:])])


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(lengths, name):
    cu = cu_of(lengths)
    x, w = operands(name, cu[-1])
    out = OPS.dense_linear(x, w, cu)
    assert out.dtype == x.dtype and out.shape == (cu[-1], w.shape[0])
    assert torch.equal(out, reference_per_sequence(x, w, cu))


def test_no_segments_gives_an_empty_result():
    x, w = operands("hc_pre-fp32", 0)
    assert OPS.dense_linear(x, w, (0,)).shape == (0, 24)


@pytest.mark.parametrize("name", ["hc_pre-fp32", "compressor-fp32", "gate-fp32", "weights_proj-bf16"])
def test_segments_do_not_depend_on_batchmates_or_position(name):
    a, w = operands(name, 37)
    alone = OPS.dense_linear(a, w, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        x = torch.cat([operands(name, before)[0], a, operands(name, after)[0]])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        assert torch.equal(OPS.dense_linear(x, w, cu)[before : before + 37], alone)


# one F.linear over a batch rounds differently from per-request calls on CUDA and on most CPUs (gemv for one or two
# rows, blocking by row count), but which shapes show it depends on the BLAS and the CPU: each case measures the
# reference twin first and skips where this machine does not show it
BREAKS = [
    pytest.param((1, 5), "hc_pre-fp32", id="L1_5-hc_pre-fp32"),
    pytest.param((37, 1), "compressor-fp32", id="L37_1-compressor-fp32"),
    pytest.param((5, 1), "hc_head-fp32", id="L5_1-hc_head-fp32"),
    pytest.param((2, 3), "hc_pre-fp32", id="L2_3-hc_pre-fp32"),
    pytest.param((1, 1, 1, 1), "gate-fp32", id="L1_1_1_1-gate-fp32"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("lengths", "name"), BREAKS)
def test_planted_bug_one_segment_for_the_batch_is_not_bitwise(lengths, name, device):
    cu = cu_of(lengths)
    x, w = (t.to(device) for t in operands(name, cu[-1]))
    expected = reference_per_sequence(x, w, cu)
    assert torch.equal(OPS.dense_linear(x, w, cu), expected)
    skip_unless_batch_changes_bits(expected, reference_per_sequence(x, w, (0, cu[-1])), "dense_linear")
    assert not torch.equal(OPS.dense_linear(x, w, (0, cu[-1])), expected)

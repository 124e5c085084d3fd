"""dense_linear: unquantized (fp32 or bf16 weight) linear over ragged tokens, one F.linear per op segment.

Twin: the `F.linear` calls of `parity.reference.model` (hc mixers, compressor wkv/wgate, indexer weights_proj,
gate), each made on one request's `[1, s, K]` tokens. The op docstring: BLAS sums K in another order for one or
two rows (gemv) than for more (gemm), so the torch backend calls F.linear per segment; the planted-bug test shows
that one call for the whole batch is not bitwise wherever the machine's BLAS rounds by row count, which is why the
op segments. The Triton backend ignores the segments (its kernel sums every row in one K-only order, so a row never
depends on its batchmates) and is judged by `gemm_check.check_gemm` with the fp32 summation allowance.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from parity.optimized.ops import OpsConfig, resolve_ops
from parity.optimized.ops.dense_linear import TF32X3_UNITS
from tests.optimized.ops.conftest import DEVICES, skip_unless_batch_changes_bits
from tests.optimized.ops.gemm_check import check_gemm, fp32_sum_allowance

OP = "dense_linear"
OPS = resolve_ops()  # the torch backend, for the segment tests of its own design
DEV = "cuda" if torch.cuda.is_available() else "cpu"

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
    ((7,), "compressor-fp32"),
    ((64,), "weights_proj-bf16"),
    ((1000,), "gate-fp32"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def operands(name, t, device="cpu"):
    n, k, dtype = SHAPES[name]
    return torch.randn(t, k).to(dtype).to(device), (torch.randn(n, k) * k**-0.5).to(dtype).to(device)


def reference_per_sequence(x, w, cu):
    return torch.cat([F.linear(x[None, a:b], w)[0] for a, b in zip(cu[:-1], cu[1:])])


def golden_and_allowance(x, w):
    """float64 product and the allowance of a kernel's own order and products: fp32 summation (K * 2^-23 of
    sum |x w|) plus what tf32x3's split products drop (TF32X3_UNITS more)."""
    absum = x.double().abs() @ w.double().abs().T
    return x.double() @ w.double().T, fp32_sum_allowance(absum, x.shape[1] + TF32X3_UNITS)


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, lengths, name):
    cu = cu_of(lengths)
    x, w = operands(name, cu[-1], DEV)
    out = impl(x, w, cu)
    assert out.dtype == x.dtype and out.shape == (cu[-1], w.shape[0])
    check_gemm(impl, out, reference_per_sequence(x, w, cu), *golden_and_allowance(x, w))


def test_no_segments_gives_an_empty_result(impl):
    x, w = operands("hc_pre-fp32", 0, DEV)
    assert impl(x, w, (0,)).shape == (0, 24)


@pytest.mark.parametrize("name", ["hc_pre-fp32", "compressor-fp32", "gate-fp32", "weights_proj-bf16"])
def test_segments_do_not_depend_on_batchmates_or_position(impl, name):
    a, w = operands(name, 37, DEV)
    alone = impl(a, w, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        x = torch.cat([operands(name, before, DEV)[0], a, operands(name, after, DEV)[0]])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        assert torch.equal(impl(x, w, cu)[before : before + 37], alone)


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
    # the torch backend's design (one F.linear per segment); the Triton backend has no segments to merge
    cu = cu_of(lengths)
    x, w = (t.to(device) for t in operands(name, cu[-1]))
    expected = reference_per_sequence(x, w, cu)
    assert torch.equal(OPS.dense_linear(x, w, cu), expected)
    skip_unless_batch_changes_bits(expected, reference_per_sequence(x, w, (0, cu[-1])), "dense_linear")
    assert not torch.equal(OPS.dense_linear(x, w, (0, cu[-1])), expected)


# ---- planted bugs of a kernel: each must fail the comparison ----------------------------------------------------


@pytest.mark.parametrize("bug", ["last K chunk dropped", "off-by-one weight row", "TF32 products"])
def test_planted_kernel_bugs_are_caught(impl, bug):
    # the comparison of every backend must reject what a buggy kernel would return: a K loop that stops one chunk
    # early, weight rows read one row off, fp32 operands rounded to TF32 (10-bit mantissa) before the products
    x, w = operands("compressor-fp32", 63, DEV)
    expected = reference_per_sequence(x, w, (0, 63))
    golden, allowance = golden_and_allowance(x, w)
    if bug == "last K chunk dropped":
        xb = x.clone()
        xb[:, -128:] = 0
        buggy = impl(xb, w, (0, 63))
    elif bug == "off-by-one weight row":
        buggy = impl(x, w.roll(1, dims=0), (0, 63))
    else:
        tf32 = lambda t: (t.view(torch.int32) & ~0x1FFF).view(torch.float32)  # noqa: E731 (truncated to 10 bits)
        buggy = (tf32(x).double() @ tf32(w).double().T).float()
    with pytest.raises(AssertionError):
        check_gemm(impl, buggy, expected, golden, allowance)


# ---- the Triton kernel's own paths ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_linear():
    resolve_ops(OpsConfig(overrides=((OP, "triton"),)))  # sets the backend up (interpreter on CPU)
    from parity.optimized.ops.triton import dense_linear as module

    return module


@pytest.mark.parametrize(
    ("m", "name"), [(1, "hc_pre-fp32"), (5, "compressor-fp32"), (3, "weights_proj-bf16"), (20, "compressor-fp32")]
)
def test_triton_split_k_gives_the_same_bits(triton_linear, m, name):
    # K = 1024 (8 chunks) and 256 (2 chunks): the split-K launch adds the chunk sums in the one-program order, by the
    # last program of each output tile (m <= 16) or by a second launch (m 20)
    x, w = operands(name, m, DEV)
    assert torch.equal(triton_linear.linear(x, w, _split=True), triton_linear.linear(x, w, _split=False))


@pytest.mark.parametrize(("split", "m"), [(False, 129), (True, 129), (True, 5)])
def test_triton_writes_every_output(triton_linear, monkeypatch, split, m):
    from parity.optimized.ops.triton import _gemm_common

    x, w = operands("compressor-fp32", m, DEV)
    clean = triton_linear.linear(x, w, _split=split)
    monkeypatch.setattr(_gemm_common, "POISON", True)
    poisoned = triton_linear.linear(x, w, _split=split)
    assert not poisoned.isnan().any() and torch.equal(poisoned, clean)

"""hadamard: Walsh-Hadamard rotation of the last dim, times d**-0.5 (indexer queries and entries, before FP4).

Twin: `parity.reference.kernels.hadamard_transform` through `ref.rotate_activation`, on one request's `[1, s, h, d]`
indexer queries and `[1, n, d]` compressor entries; the optimized model calls `ops.hadamard(x, d ** -0.5)` on the
flat `[T, h, d]` / `[m, d]`. Every backend follows the same fp32 butterfly order, so every backend is judged bitwise.
"""

import itertools

import pytest
import torch

from parity.reference import kernels
from parity.reference import model as ref
from tests.optimized.ops.conftest import check

OP = "hadamard"

CASES = [
    ((1,), 4, 128),
    ((2,), None, 128),
    ((5,), 3, 64),
    ((37,), None, 256),
    ((63,), 4, 128),
    ((129,), 1, 64),
    ((1, 2, 5), 4, 128),
    ((37, 1, 63), None, 128),
    ((2, 5, 1, 3), 3, 256),
    ((3, 4), 64, 128),  # the shipped index heads
]
PARAMS = [pytest.param(*c, id="L{}-H{}-D{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def run(impl, x, scale):
    return impl(x.to(device_of(impl)), scale).cpu()


def make(t, h, d):
    return torch.randn((t, d) if h is None else (t, h, d)).to(torch.bfloat16)


@pytest.mark.parametrize(("lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, lengths, h, d):
    cu = cu_of(lengths)
    x = make(cu[-1], h, d)
    out = run(impl, x, x.size(-1) ** -0.5)
    expected = torch.cat([ref.rotate_activation(x[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16
    check(impl, out, expected)


@pytest.mark.parametrize("d", [1, 2, 16, 512])
def test_other_widths_scales_and_fp32(impl, d):
    # the twin's general form: any power of two, any scale, fp32 in and out (one rounding less)
    x = torch.randn(9, d) * 100
    check(impl, run(impl, x, 0.3), kernels.hadamard_transform(x, 0.3))
    xb = x.to(torch.bfloat16)
    check(impl, run(impl, xb, 1.0), kernels.hadamard_transform(xb, 1.0))


def test_hand_math_on_basis_vectors(impl):
    # H e_j is column j of the Sylvester matrix: +-1 entries, (-1)^popcount(i & j); times 1/8 (exact) for d = 64
    d = 64
    out = run(impl, torch.eye(d, dtype=torch.bfloat16), d**-0.5)
    i = torch.arange(d)
    parity = torch.tensor([bin(v).count("1") % 2 for v in (i[:, None] & i[None, :]).flatten().tolist()])
    expected = (1.0 - 2.0 * parity.view(d, d).float()) / 8
    check(impl, out, expected.to(torch.bfloat16))


def test_strided_input_and_empty_batch(impl):
    x = make(40, None, 256)
    view = x[::3, 128:]  # every third row, the second half: row stride 768, not contiguous
    check(impl, run(impl, view, 128**-0.5), kernels.hadamard_transform(view, 128**-0.5))
    assert run(impl, make(0, 4, 128), 128**-0.5).shape == (0, 4, 128)


def test_output_is_fully_written(impl, monkeypatch):
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    x = make(129, 4, 128)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = run(impl, x, 128**-0.5)
    monkeypatch.undo()
    check(impl, out, kernels.hadamard_transform(x, 128**-0.5))


def test_rows_do_not_depend_on_batchmates_or_position(impl):
    a = make(37, 4, 128)
    alone = run(impl, a, 128**-0.5)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        x = torch.cat([make(before, 4, 128), a, make(after, 4, 128)])
        assert torch.equal(run(impl, x, 128**-0.5)[before : before + 37], alone)


def test_rejects_a_dim_that_is_not_a_power_of_two(impl):
    with pytest.raises(ValueError, match="power of two"):
        run(impl, make(3, 4, 96), 96**-0.5)


def test_planted_bug_bf16_butterflies_are_caught(impl):
    # a kernel that rounds to bf16 after every butterfly stage must fail the comparison
    x = make(63, 4, 128)
    y = x
    stride = 1
    while stride < 128:
        y = y.reshape(63, 4, 128 // (2 * stride), 2, stride)
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = torch.stack([lo + hi, lo - hi], dim=-2)  # bf16 adds
        stride *= 2
    buggy = (y.reshape(63, 4, 128).float() * 128**-0.5).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        check(impl, buggy, run(impl, x, 128**-0.5))


def test_planted_bug_reversed_stage_order_is_caught(impl):
    # the triton kernel with its butterflies highest stride first (the kernel's REVERSED hook): the same transform
    # in exact arithmetic, other fp32 roundings (fp32 inputs: sums of bf16 inputs are mostly exact in any order)
    if impl.backend != "triton":
        pytest.skip("the planted-bug hook is in the triton kernel")
    from parity.optimized.ops.triton.hadamard import hadamard_planted

    x = torch.randn(63, 4, 128)
    got = hadamard_planted(x.to(device_of(impl)), 128**-0.5, reversed_stages=True).cpu()
    with pytest.raises(AssertionError):
        check(impl, got, kernels.hadamard_transform(x, 128**-0.5))

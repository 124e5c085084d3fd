"""hadamard: Walsh-Hadamard rotation of the last dim, times d**-0.5 (indexer queries and entries, before FP4).

Twin: `parity.reference.kernels.hadamard_transform` through `ref.rotate_activation`, on one request's `[1, s, h, d]`
indexer queries and `[1, n, d]` compressor entries; the optimized model calls `ops.hadamard(x, d ** -0.5)` on the
flat `[T, h, d]` / `[m, d]`.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.reference import model as ref

OPS = resolve_ops()

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
]
PARAMS = [pytest.param(*c, id="L{}-H{}-D{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def make(t, h, d):
    return torch.randn((t, d) if h is None else (t, h, d)).to(torch.bfloat16)


@pytest.mark.parametrize(("lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(lengths, h, d):
    cu = cu_of(lengths)
    x = make(cu[-1], h, d)
    out = OPS.hadamard(x, x.size(-1) ** -0.5)
    expected = torch.cat([ref.rotate_activation(x[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_hand_math_on_basis_vectors():
    # H e_j is column j of the Sylvester matrix: +-1 entries, (-1)^popcount(i & j); times 1/8 (exact) for d = 64
    d = 64
    out = OPS.hadamard(torch.eye(d, dtype=torch.bfloat16), d**-0.5)
    i = torch.arange(d)
    parity = torch.tensor([bin(v).count("1") % 2 for v in (i[:, None] & i[None, :]).flatten().tolist()])
    expected = (1.0 - 2.0 * parity.view(d, d).float()) / 8
    assert torch.equal(out, expected.to(torch.bfloat16))


def test_rows_do_not_depend_on_batchmates_or_position():
    a = make(37, 4, 128)
    alone = OPS.hadamard(a, 128**-0.5)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        x = torch.cat([make(before, 4, 128), a, make(after, 4, 128)])
        assert torch.equal(OPS.hadamard(x, 128**-0.5)[before : before + 37], alone)


def test_rejects_a_dim_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        OPS.hadamard(make(3, 4, 96), 96**-0.5)


def test_planted_bug_bf16_butterflies_are_caught():
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
    assert not torch.equal(buggy, OPS.hadamard(x, 128**-0.5))

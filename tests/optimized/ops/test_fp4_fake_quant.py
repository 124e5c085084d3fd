"""fp4_fake_quant: in-place FP4 e2m1 fake-quant with ue8m0 scales per 32 (indexer queries and indexer entries).

Twin: `parity.reference.kernels.fp4_act_quant(x, 32, inplace=True)`, as `ref.Indexer.forward` applies it to one
request's rotated queries `[1, s, h, d]` and `ref.Compressor.forward` (rotate=True) to its entries `[1, n, d]`.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.reference import kernels
from parity.reference import model as ref

OPS = resolve_ops()

# H None: 2-D entries [T, d]; otherwise queries [T, H, d]
CASES = [
    ((1,), 4, 128),
    ((2,), None, 128),
    ((5,), 3, 64),
    ((37,), None, 64),
    ((63,), 4, 128),
    ((129,), None, 128),
    ((1, 2, 5), 4, 128),
    ((37, 1, 63), None, 128),
    ((2, 5, 1), 1, 64),
]
PARAMS = [pytest.param(*c, id="L{}-H{}-D{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def rotated(t: int, h, d: int) -> torch.Tensor:
    shape = (t, d) if h is None else (t, h, d)
    return ref.rotate_activation(torch.randn(shape).to(torch.bfloat16))


def reference_per_sequence(x, cu, block=ref.FP4_BLOCK_SIZE):
    out = x.clone()
    for a, b in zip(cu[:-1], cu[1:]):
        seq = out[a:b].clone()[None]
        kernels.fp4_act_quant(seq, block, True)
        out[a:b] = seq[0]
    return out


@pytest.mark.parametrize(("lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(lengths, h, d):
    cu = cu_of(lengths)
    x = rotated(cu[-1], h, d)
    expected = reference_per_sequence(x, cu)
    out = OPS.fp4_fake_quant(x)  # default block: the reference's FP4_BLOCK_SIZE
    assert out is x
    assert torch.equal(x, expected)


def test_rows_do_not_depend_on_batchmates_or_position():
    a = rotated(37, 4, 128)
    alone = OPS.fp4_fake_quant(a.clone(), 32)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        batch = torch.cat([rotated(before, 4, 128), a, rotated(after, 4, 128)])
        OPS.fp4_fake_quant(batch, 32)
        assert torch.equal(batch[before : before + 37], alone)


def test_planted_bug_wrong_group_size_is_caught():
    cu = cu_of((37, 1, 63))
    x = rotated(cu[-1], 4, 128)
    expected = reference_per_sequence(x, cu)
    OPS.fp4_fake_quant(x, 64)
    assert not torch.equal(x, expected)

"""fp4_fake_quant: in-place FP4 e2m1 fake-quant with ue8m0 scales per 32 (indexer queries and indexer entries).

Twin: `parity.reference.kernels.fp4_act_quant(x, 32, inplace=True)`, as `ref.Indexer.forward` applies it to one
request's rotated queries `[1, s, h, d]` and `ref.Compressor.forward` (rotate=True) to its entries `[1, n, d]`.
Every backend is exact here (power-of-two scales from the bits, the e2m1 table with ties to the even code), so every
backend is judged bitwise.
"""

import itertools

import pytest
import torch

from parity.formats import E2M1_RNE_TABLE
from parity.reference import kernels
from parity.reference import model as ref
from tests.optimized.ops.conftest import check

OP = "fp4_fake_quant"

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
    ((3, 4), 64, 128),  # the shipped index heads
]
PARAMS = [pytest.param(*c, id="L{}-H{}-D{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


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


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int16)  # -0 and +0 differ here (the e2m1 rounding keeps the sign)


@pytest.mark.parametrize(("lengths", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, lengths, h, d):
    cu = cu_of(lengths)
    x = rotated(cu[-1], h, d)
    expected = reference_per_sequence(x, cu)
    x = x.to(device_of(impl))
    out = impl(x)  # default block: the reference's FP4_BLOCK_SIZE
    assert out is x
    check(impl, bits(x.cpu()), bits(expected))


def test_every_rounding_edge_and_tie(impl):
    # each group holds a 6 (its amax, so the scale is exactly 1) and one edge of the spec §3.3 table, just below,
    # on and just above it, with both signs, plus +-0 and saturating values
    vals = []
    for edge, _, _ in E2M1_RNE_TABLE:
        e = torch.tensor(edge, dtype=torch.bfloat16)
        for v in (torch.nextafter(e, torch.tensor(0.0, dtype=torch.bfloat16)), e, torch.nextafter(e, 2 * e)):
            vals += [float(v), -float(v)]
    vals += [0.0, -0.0, 5.9, -6.0, 0.24, -0.26]
    groups = torch.tensor(vals).view(-1, 1)
    x = torch.cat([groups, torch.full((groups.shape[0], 31), 6.0)], dim=1).to(torch.bfloat16)
    x[:, 5] = -3.0
    want = kernels.fp4_act_quant(x.clone(), 32, True)
    got = impl(x.to(device_of(impl)), 32).cpu()
    check(impl, bits(got), bits(want))


def test_tiny_and_zero_groups(impl):
    # groups below the 6 * 2^-126 amax floor and all-zero groups: the floor's scale, signed zeros kept
    x = torch.zeros(4, 64)
    x[0, :32] = 1e-38
    x[1, 32:] = -3e-39
    x[2] = torch.randn(64) * 1e-30
    x = x.to(torch.bfloat16)
    x[3, 7] = -0.0
    want = kernels.fp4_act_quant(x.clone(), 32, True)
    got = impl(x.to(device_of(impl)), 32).cpu()
    check(impl, bits(got), bits(want))


def test_strided_view_is_written_in_place(impl):
    buf = rotated(16, None, 256).to(device_of(impl))
    want = buf.cpu().clone()
    kernels.fp4_act_quant(want[:, 64:192], 32, True)
    impl(buf[:, 64:192], 32)
    check(impl, bits(buf.cpu()), bits(want))


def test_rows_do_not_depend_on_batchmates_or_position(impl):
    dev = device_of(impl)
    a = rotated(37, 4, 128)
    alone = impl(a.clone().to(dev), 32)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        batch = torch.cat([rotated(before, 4, 128), a, rotated(after, 4, 128)]).to(dev)
        impl(batch, 32)
        assert torch.equal(bits(batch[before : before + 37]), bits(alone))


def test_planted_bug_wrong_group_size_is_caught(impl):
    cu = cu_of((37, 1, 63))
    x = rotated(cu[-1], 4, 128)
    expected = reference_per_sequence(x, cu)
    x = x.to(device_of(impl))
    impl(x, 64)
    with pytest.raises(AssertionError):
        check(impl, bits(x.cpu()), bits(expected))


def test_planted_bug_wrong_scale_exponent_is_caught(impl):
    # the triton kernel with its scale exponent off by one (the kernel's SCALE_SHIFT hook)
    if impl.backend != "triton":
        pytest.skip("the planted-bug hook is in the triton kernel")
    from parity.optimized.ops.triton.fp4_fake_quant import fp4_fake_quant_planted

    x = rotated(63, 4, 128)
    expected = kernels.fp4_act_quant(x.clone(), 32, True)
    got = fp4_fake_quant_planted(x.to(device_of(impl)), 32, scale_shift=1).cpu()
    with pytest.raises(AssertionError):
        check(impl, bits(got), bits(expected))

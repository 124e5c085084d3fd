"""kv_fake_quant: in-place FP8 fake-quant of the KV non-rope dims, groups of 64.

Twin: `parity.reference.kernels.act_quant(kv[..., :-rd], 64, fmt, dtype, inplace=True)` (current revision) and
`kernels.act_quant_initial` (initial revision, `fp8=False`), as `ref.Attention.forward` applies them to one
request's window KV `[1, s, d]` and `ref.Compressor.forward` to its new entries `[1, n, d]`. The op gets a strided
view of the flat `[T, d]` KV and must write through it, leaving the rope dims alone. Every backend is exact here, so
every backend is judged bitwise.
"""

import itertools

import pytest
import torch

from parity.reference import kernels
from tests.optimized.ops.conftest import check

OP = "kv_fake_quant"
RD = 64  # rope dims at the end of each row (tiny and the shipped configs)
BLOCK = 64

CASES = [
    ((1,), 128),
    ((2,), 192),
    ((5,), 128),
    ((37,), 320),
    ((63,), 128),
    ((129,), 192),
    ((1, 2, 5), 128),
    ((37, 1, 63), 192),
    ((3, 1, 5, 1, 2), 320),
    ((7, 1), 512),  # the shipped head dim: 448 quantized dims, 7 groups (not a power of two)
]
PARAMS = [pytest.param(*c, id="L{}-D{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]
POLICIES = [
    pytest.param("ue8m0", torch.float8_e8m0fnu, id="ue8m0-e8m0"),
    pytest.param(None, torch.float32, id="none-fp32"),
]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def kv_rows(t: int, d: int) -> torch.Tensor:
    return (torch.randn(t, d) * torch.logspace(-2, 1, t).unsqueeze(1)).to(torch.bfloat16)


def reference_per_sequence(kv, cu, fmt, sdtype, fp8):
    quant = kernels.act_quant if fp8 else kernels.act_quant_initial
    out = kv.clone()
    for a, b in zip(cu[:-1], cu[1:]):
        seq = out[a:b].clone()[None]  # the request's own [1, s, d] tensor
        quant(seq[..., :-RD], BLOCK, fmt, sdtype, True)
        out[a:b] = seq[0]
    return out


@pytest.mark.parametrize("fp8", [True, False], ids=["current", "initial"])
@pytest.mark.parametrize(("fmt", "sdtype"), POLICIES)
@pytest.mark.parametrize(("lengths", "d"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, lengths, d, fmt, sdtype, fp8):
    cu = cu_of(lengths)
    kv = kv_rows(cu[-1], d)
    expected = reference_per_sequence(kv, cu, fmt, sdtype, fp8)
    kv = kv.to(device_of(impl))
    original = kv.clone()
    view = kv[..., :-RD]
    out = impl(view, BLOCK, fmt, sdtype, fp8)
    assert out.data_ptr() == view.data_ptr()  # in place, through the strided view
    check(impl, kv.cpu(), expected)
    assert torch.equal(kv[..., -RD:], original[..., -RD:])


def test_initial_revision_is_an_identity_with_pow2_scales(impl):
    # hand math: x / 2^e is exact, bf16(bf16(x / s) * s) == x (spec §3.2); with power-of-two scales only
    kv = kv_rows(63, 192).to(device_of(impl))
    original = kv.clone()
    impl(kv[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, False)
    assert torch.equal(kv, original)


def test_views_whose_rows_do_not_collapse(impl):
    # a [T, 2, d] view with a gap between the two halves' rows: no single row stride, still written in place
    buf = kv_rows(24, 2 * 256).to(device_of(impl))
    view = buf.view(24, 2, 256)[:, :, :192]
    want = buf.cpu().clone()
    kernels.act_quant(want.view(24, 2, 256)[:, :, :192], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    impl(view, BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    check(impl, buf.cpu(), want)


def test_empty_and_single_group(impl):
    dev = device_of(impl)
    empty = torch.zeros(0, 128, dtype=torch.bfloat16, device=dev)
    impl(empty[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    one = kv_rows(1, 128)
    want = one.clone()
    kernels.act_quant(want[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    one = one.to(dev)
    impl(one[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    check(impl, one.cpu(), want)


def test_rows_do_not_depend_on_batchmates_or_position(impl):
    dev = device_of(impl)
    a = kv_rows(37, 192)
    alone = a.clone().to(dev)
    impl(alone[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        batch = torch.cat([kv_rows(before, 192), a, kv_rows(after, 192)]).to(dev)
        impl(batch[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
        assert torch.equal(batch[before : before + 37], alone)


def test_planted_bug_quantizing_a_copy_is_caught(impl):
    # a backend that quantizes a contiguous copy of the view never writes the KV: the comparison must fail
    cu = cu_of((37, 1, 63))
    kv = kv_rows(cu[-1], 192)
    expected = reference_per_sequence(kv, cu, "ue8m0", torch.float8_e8m0fnu, True)
    kv = kv.to(device_of(impl))
    impl(kv[..., :-RD].contiguous(), BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    with pytest.raises(AssertionError):
        check(impl, kv.cpu(), expected)


def test_planted_bug_wrong_group_is_caught(impl):
    # groups of 128 instead of the KV's 64 (one scale for two groups)
    cu = cu_of((37, 1, 63))
    kv = kv_rows(cu[-1], 320)
    expected = reference_per_sequence(kv, cu, "ue8m0", torch.float8_e8m0fnu, True)
    kv = kv.to(device_of(impl))
    impl(kv[..., :-RD], 2 * BLOCK, "ue8m0", torch.float8_e8m0fnu, True)
    with pytest.raises(AssertionError):
        check(impl, kv.cpu(), expected)


def test_planted_bug_wrong_scale_exponent_is_caught(impl):
    # the triton kernel with its scale exponent off by one (the kernel's SCALE_SHIFT hook)
    if impl.backend != "triton":
        pytest.skip("the planted-bug hook is in the triton kernel")
    from parity.optimized.ops.triton.kv_fake_quant import kv_fake_quant_planted

    cu = cu_of((37, 1, 63))
    kv = kv_rows(cu[-1], 192)
    expected = reference_per_sequence(kv, cu, "ue8m0", torch.float8_e8m0fnu, True)
    kv = kv.to(device_of(impl))
    kv_fake_quant_planted(kv[..., :-RD], BLOCK, "ue8m0", torch.float8_e8m0fnu, True, scale_shift=-1)
    with pytest.raises(AssertionError):
        check(impl, kv.cpu(), expected)

"""act_quant: FP8 e4m3 quantization per (token, 128-group) before a GEMM.

Twin: `parity.reference.kernels.act_quant`, which `ref.linear` calls on one request's `[1, s, K]` activations. The op
runs on the flat `[T, K]` tokens of a ragged batch; each token's groups must quantize exactly as in its own request.
Every backend is exact here (amax, power-of-two scale from the bits, RNE to e4m3), so every backend is judged
bitwise; e4m3 and e8m0 tensors are compared by their bytes.
"""

import itertools

import pytest
import torch

from parity.reference import kernels
from tests.optimized.ops.conftest import check

OP = "act_quant"

# (scale_fmt, scale_dtype) as ModelArgs derives them: scale_dtype "fp8" -> ("ue8m0", e8m0), "fp32" -> (fmt, fp32)
POLICIES = [
    pytest.param("ue8m0", torch.float8_e8m0fnu, id="ue8m0-e8m0"),
    pytest.param("ue8m0", torch.float32, id="ue8m0-fp32"),
    pytest.param(None, torch.float32, id="none-fp32"),
]
CASES = [
    ((1,), 128),
    ((2,), 256),
    ((5,), 128),
    ((37,), 256),
    ((129,), 128),
    ((1, 2, 5), 256),
    ((37, 1, 63), 128),
    ((2, 5, 1, 3, 1), 256),
    ((7, 64), 384),  # GEMM row counts M = 7, 64 and a K of three groups
    ((1000,), 128),
]
PARAMS = [pytest.param(*c, id="L{}-K{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def bits(t: torch.Tensor) -> torch.Tensor:
    # fp8 / e8m0 tensors compare by their bytes (torch.equal has no float8 kernel on every build)
    return t.view(torch.uint8) if t.element_size() == 1 else t


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def run(impl, x, *args, **kwargs):
    y, s = impl(x.to(device_of(impl)), *args, **kwargs)
    return y.cpu(), s.cpu()


def activations(t: int, k: int) -> torch.Tensor:
    x = torch.randn(t, k) * torch.logspace(-6, 2, t).unsqueeze(1)  # rows from below the 1e-4 amax floor to large
    if t:
        x[t // 2, : k // 2] = 0.0  # an all-zero group
        x[0, :4] = torch.tensor([448.0 * 2**-3, -448.0 * 2**-3 * (1 + 2**-7), 2**-130, -0.0])  # ties and edges
    return x.to(torch.bfloat16)


def reference_per_sequence(x, cu, fmt, sdtype):
    ys, ss = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        y, s = kernels.act_quant(x[None, a:b], 128, fmt, sdtype)  # the reference's [1, s, K]
        ys.append(y[0])
        ss.append(s[0])
    return torch.cat(ys), torch.cat(ss)


@pytest.mark.parametrize(("fmt", "sdtype"), POLICIES)
@pytest.mark.parametrize(("lengths", "k"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, lengths, k, fmt, sdtype):
    cu = cu_of(lengths)
    x = activations(cu[-1], k)
    y, s = run(impl, x, 128, fmt, sdtype)
    ry, rs = reference_per_sequence(x, cu, fmt, sdtype)
    assert y.dtype == torch.float8_e4m3fn and s.dtype == sdtype
    assert y.shape == (cu[-1], k) and s.shape == (cu[-1], k // 128)
    check(impl, bits(y), bits(ry))
    check(impl, bits(s), bits(rs))


def test_leading_dims_and_strided_input(impl):
    # a [b, s, K] input and a non-contiguous view (every other row of a wider buffer): the twin's any-strides input
    x = activations(24, 512)
    for view in (x.view(2, 12, 512), x[::2, 128:384], x.view(4, 6, 512)[:, ::2]):
        y, s = run(impl, view, 128, "ue8m0", torch.float8_e8m0fnu)
        ry, rs = kernels.act_quant(view, 128, "ue8m0", torch.float8_e8m0fnu)
        check(impl, bits(y), bits(ry))
        check(impl, bits(s), bits(rs))


def test_inplace_fake_quant(impl):
    # inplace=True: x <- bf16(e4m3(x / s) * s), written through the view (the KV call shape)
    dev = device_of(impl)
    kv = activations(37, 192).to(dev)
    want = kv.cpu().clone()
    kernels.act_quant(want[..., :-64], 64, "ue8m0", torch.float8_e8m0fnu, True)
    out = impl(kv[..., :-64], 64, "ue8m0", torch.float8_e8m0fnu, True)
    assert out.data_ptr() == kv.data_ptr()
    check(impl, kv.cpu(), want)


def test_empty_batch(impl):
    y, s = run(impl, torch.zeros(0, 256, dtype=torch.bfloat16), 128, "ue8m0", torch.float8_e8m0fnu)
    assert y.shape == (0, 256) and s.shape == (0, 2) and s.dtype == torch.float8_e8m0fnu


def poison_empty(monkeypatch) -> None:
    """Every `torch.empty` from here on (until `monkeypatch.undo()`) starts as NaN (0xff bytes for 1-byte dtypes: NaN in
    e4m3 and e8m0), so an element a kernel leaves unwritten shows up."""
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.view(torch.uint8).fill_(0xFF).view(t.dtype) if t.element_size() == 1 else t.fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", poisoned)


def test_outputs_are_fully_written(impl, monkeypatch):
    # every allocation made during the call starts as NaN (`poison_empty`): an unwritten element shows up
    x = activations(129, 384)
    poison_empty(monkeypatch)
    y, s = run(impl, x, 128, "ue8m0", torch.float8_e8m0fnu)
    y32, s32 = run(impl, x, 128, "ue8m0", torch.float32)
    monkeypatch.undo()
    assert not y.float().isnan().any() and not s.float().isnan().any() and not s32.isnan().any()
    ry, rs = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    check(impl, bits(y), bits(ry))
    check(impl, bits(s), bits(rs))


def test_rows_do_not_depend_on_batchmates_or_position(impl):
    a = activations(37, 256)
    alone = run(impl, a, 128, "ue8m0", torch.float8_e8m0fnu)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        batch = torch.cat([activations(before, 256), a, activations(after, 256)])
        y, s = run(impl, batch, 128, "ue8m0", torch.float8_e8m0fnu)
        assert torch.equal(bits(y[before : before + 37]), bits(alone[0]))
        assert torch.equal(bits(s[before : before + 37]), bits(alone[1]))


def test_planted_bug_unrounded_scales_are_caught(impl):
    # a backend that ignores scale_fmt="ue8m0" (plain amax/448 scales) must fail the comparison above
    cu = cu_of((37, 1, 63))
    x = activations(cu[-1], 256)
    y, _ = run(impl, x, 128, None, torch.float32)
    ry, _ = reference_per_sequence(x, cu, "ue8m0", torch.float32)
    with pytest.raises(AssertionError):
        check(impl, bits(y), bits(ry))


def test_planted_bug_wrong_scale_exponent_is_caught(impl):
    # the triton kernel with its scale exponent off by one (the kernel's SCALE_SHIFT hook)
    if impl.backend != "triton":
        pytest.skip("the planted-bug hook is in the triton kernel")
    from parity.optimized.ops.triton.act_quant import quantize

    x = activations(63, 256)
    ry, rs = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    y, s = quantize(x.to(device_of(impl)), 128, "ue8m0", torch.float8_e8m0fnu, scale_shift=1)
    with pytest.raises(AssertionError):
        check(impl, bits(s.cpu()), bits(rs))
    with pytest.raises(AssertionError):
        check(impl, bits(y.cpu()), bits(ry))


@pytest.mark.parametrize(("fmt", "sdtype"), POLICIES)
@pytest.mark.parametrize("t", [1, 7, 129])
def test_pairs_order_copy_from_the_same_launch(impl, fmt, sdtype, t, monkeypatch):
    # moe_experts' FP4 tiles read the values in the pairs order, which the triton kernel stores beside the natural
    # ones: the same values and scales as without the copy, and the copy byte for byte `pairs_order` of them (its
    # allocations start as NaN, as in test_outputs_are_fully_written: an unwritten byte shows)
    if impl.backend != "triton":
        pytest.skip("the pairs-order copy is the triton kernel's")
    from parity.optimized.ops.triton._gemm_common import pairs_order
    from parity.optimized.ops.triton.act_quant import quantize

    x = activations(t, 384).to(device_of(impl))
    y, s = quantize(x, 128, fmt, sdtype)
    poison_empty(monkeypatch)
    py, ps, pp = quantize(x, 128, fmt, sdtype, pairs=True)
    monkeypatch.undo()
    assert torch.equal(bits(py), bits(y)) and torch.equal(bits(ps), bits(s))
    assert torch.equal(bits(pp), bits(pairs_order(y)))
    assert not torch.equal(bits(pp), bits(y))  # the orders differ: a copy in the natural order would not pass

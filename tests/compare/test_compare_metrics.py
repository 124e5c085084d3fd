"""Metrics: hand-computed float64 values, exact 1.0 for identical tensors, defined values at zero and NaN."""

import math
import struct

import pytest
import torch

from parity.compare import compare_logits, compare_tensors, cosine, fused
from parity.compare.fused import slice_cosines
from parity.compare.metrics import bitwise_equal, rowwise_cosine

torch.manual_seed(42)


def test_hand_computed_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([1.0, 2.0, 3.0, 5.0])
    m = compare_tensors(a, b, atol=0.5)
    # Σab = 34, Σa² = 30, Σb² = 39, |a - b| = [0, 0, 0, 1]
    assert m.cos == pytest.approx(34 / math.sqrt(30 * 39), rel=1e-15)
    assert m.max_abs == 1.0 and m.max_rel == 0.25
    assert m.rel_l2 == pytest.approx(1 / math.sqrt(30), rel=1e-15)
    assert m.rel_diff == pytest.approx(1 - 2 * 34 / (30 + 39), rel=1e-14)
    assert m.norm_ratio == pytest.approx(math.sqrt(39 / 30), rel=1e-15)
    assert (m.mismatches, m.bitwise, m.nan_a, m.inf_b) == (1, False, 0, 0)
    assert compare_tensors(a, b, atol=1.0).mismatches == 0
    assert compare_tensors(a, b, atol=0.0, rtol=0.2).mismatches == 1
    assert compare_tensors(a, b, atol=0.0, rtol=0.25).mismatches == 0


def test_metrics_are_float64_even_for_bf16_inputs():
    # 256 and 257 round to the same bf16 value; 1 and 1 + 2**-7 do not, and float32 math would still see them
    a = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0 + 2**-7, 256.0], dtype=torch.bfloat16)
    m = compare_tensors(a, b)
    x, y = [1.0, 256.0], [1.0 + 2**-7, 256.0]
    dot, nx, ny = sum(p * q for p, q in zip(x, y, strict=True)), math.hypot(*x), math.hypot(*y)
    assert m.cos == pytest.approx(dot / (nx * ny), rel=1e-15) and m.max_abs == 2**-7


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        pytest.param((1,), torch.bfloat16, id="1-bf16"),
        pytest.param((4097,), torch.bfloat16, id="4097-bf16"),
        pytest.param((3, 129, 5), torch.bfloat16, id="3x129x5-bf16"),
        pytest.param((63, 17), torch.float16, id="63x17-fp16"),
        pytest.param((1000,), torch.float32, id="1000-fp32"),
        pytest.param((7, 33), torch.float8_e4m3fn, id="7x33-fp8"),
    ],
)
def test_identical_tensors_have_cos_exactly_one(shape, dtype):
    a = (torch.randn(shape) * 3).to(dtype)
    m = compare_tensors(a, a.clone())
    assert m.bitwise and m.cos == 1.0 and m.max_abs == 0.0 and m.rel_diff == 0.0 and m.norm_ratio == 1.0
    x = a.float().double().flatten()
    assert cosine(x, x.clone()) == 1.0


def test_cos_never_exceeds_one():
    # equal values through different dtypes (not bitwise) and near-identical vectors: clamped, never > 1
    for _ in range(20):
        a = torch.randn(513, dtype=torch.float64) * 1e3
        b = a.clone()
        b[0] = math.nextafter(b[0].item(), math.inf)
        assert cosine(a, b) <= 1.0
        c = compare_tensors(a.to(torch.bfloat16), a.to(torch.bfloat16).float())
        assert c.cos == 1.0 and not c.bitwise
    assert (rowwise_cosine(torch.ones(3, 5) * 1e154, torch.ones(3, 5) * 1e154) <= 1).all()


def test_zero_vectors_give_defined_values():
    z = torch.zeros(6)
    m = compare_tensors(z, z.clone())
    assert (m.cos, m.rel_diff, m.norm_ratio, m.rel_l2) == (1.0, 0.0, 1.0, 0.0)
    m = compare_tensors(z, torch.ones(6))
    assert (m.cos, m.rel_diff, m.norm_ratio, m.max_rel, m.rel_l2) == (0.0, 1.0, math.inf, math.inf, math.inf)
    m = compare_tensors(torch.ones(6), z)
    assert (m.cos, m.norm_ratio, m.max_rel, m.rel_l2) == (0.0, 0.0, 1.0, 1.0)


def test_nan_and_inf_are_counted_and_metrics_use_finite_positions():
    a = torch.tensor([1.0, 2.0, math.inf, 4.0])
    b = torch.tensor([1.0, math.nan, math.inf, 4.0])
    m = compare_tensors(a, b, atol=0.0)
    assert (m.nan_a, m.nan_b, m.inf_a, m.inf_b) == (0, 1, 1, 1)
    assert m.cos == 1.0 and m.max_abs == 0.0 and m.mismatches == 1
    same_nan = torch.tensor([1.0, math.nan])
    assert compare_tensors(same_nan, same_nan.clone()).bitwise


@pytest.mark.parametrize(
    ("a", "b", "sets_equal"),
    [
        pytest.param([[3, 1, 2], [7, 8, 9]], [[1, 2, 3], [9, 7, 8]], True, id="topk-reordered"),
        pytest.param([[3, 1, 2]], [[1, 2, 4]], False, id="topk-other-index"),
        pytest.param([0, 1, 2], [0, 2, 1], False, id="1d-positions-exact"),
        pytest.param([0, 1, 2], [0, 1, 2], True, id="1d-equal"),
    ],
)
def test_integer_tensors_compare_as_sets_not_floats(a, b, sets_equal):
    m = compare_tensors(torch.tensor(a), torch.tensor(b, dtype=torch.int32))
    assert m.sets_equal is sets_equal and m.cos is None and m.rel_diff is None


def test_fp8_and_e8m0_bitwise_through_bytes():
    a = torch.randn(5, 7).to(torch.float8_e4m3fn)
    b = a.clone()
    assert bitwise_equal(a, b)
    b.view(torch.uint8)[2, 3] ^= 1
    m = compare_tensors(a, b)
    assert not m.bitwise and m.max_abs > 0 and m.cos < 1
    s = torch.full((4,), 2.0).to(torch.float8_e8m0fnu)
    assert compare_tensors(s, s.clone()).bitwise and not bitwise_equal(s, s.float())
    packed = torch.arange(6, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    m = compare_tensors(packed, packed.clone())
    assert m.bitwise and m.cos is None


def test_worst_slices_find_the_planted_token_head_channel():
    a = torch.randn(9, 4, 6, dtype=torch.float64)
    b = a.clone()
    b[5, 2, 3] += 10.0
    m = compare_tensors(a, b, token_dims=1)
    assert m.worst_token[0] == (5,) and m.worst_head[0] == 2 and m.worst_channel[0] == 3
    assert m.worst_token[1] < m.cos
    batched = compare_tensors(a.view(3, 3, 4, 6), b.view(3, 3, 4, 6), token_dims=2)
    assert batched.worst_token[0] == (1, 2) and batched.worst_head[0] == 2


def test_logit_metrics_hand_computed():
    x = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    m = compare_logits(x, y, k=2)
    p = [math.exp(v) / sum(math.exp(u) for u in (0, 1, 2)) for v in (0, 1, 2)]
    q = [p[0], p[2], p[1]]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) / 2
    assert (m.top1, m.topk_overlap, m.k) == (0.5, 1.0, 2)
    assert m.kl == pytest.approx(kl, rel=1e-12)
    assert compare_logits(x, torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), k=1).topk_overlap == 0.0


def test_shape_mismatch_is_refused_not_truncated():
    with pytest.raises(ValueError, match="equal shapes"):
        compare_tensors(torch.zeros(4), torch.zeros(5))


def _torch_worst(sums, err):
    cos = slice_cosines(sums, err)
    i = int(cos.argmin())
    return i, float(cos[i])


def _same(got, want) -> bool:
    """The same slice, and the same cosine bits (NaN for NaN)."""
    (i, a), (j, b) = got, want
    return i == j and (struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b)))


def test_compiled_worst_slice_is_the_tensor_form_bit_for_bit():
    # the worst slice (per token, per head, per channel) comes from one compiled pass on CPU (`tile_loop.worst_slice`);
    # it must pick the slice and give the cosine bits of `slice_cosines` + `argmin`: each combination of zeros (both
    # signs), subnormal, tiny and huge sums, |xy| > nx ny (clamped), infinities and NaN as a slice of its own, then
    # all of them at once (argmin: the first NaN), the finite ones at once, and random rows with ties (the first of
    # equal minima wins) and strides
    loops = fused._tile_loops()
    assert loops is not None, "numba is a dependency: the compiled pass must be testable here"
    xys = [0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 1e-300, -1e-300, 1e300, math.inf, -math.inf, math.nan]
    squares = [0.0, 5e-324, 1e-320, 1e-300, 1.0, 4.0, 1e300, math.inf, math.nan]
    cases = [(xy, xx, yy, e) for xy in xys for xx in squares for yy in squares for e in (0.0, 1.0, math.nan)]
    sums = torch.tensor([c[:3] for c in cases], dtype=torch.float64).T.contiguous()
    err = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    for j, case in enumerate(cases):
        one = (sums[:, j : j + 1], err[j : j + 1])
        assert _same(loops.worst_slice(*one), _torch_worst(*one)), case
    finite = torch.isfinite(sums).all(0) & ~err.isnan()
    for s, e in ((sums, err), (sums[:, finite], err[finite])):
        assert _same(loops.worst_slice(s, e), _torch_worst(s, e))
    g = torch.Generator().manual_seed(0)
    for k in (2, 7, 8192):
        x, y = torch.randn(2, k, generator=g, dtype=torch.float64)
        s4, e = torch.stack([x * y, x * x, y * y, (x - y) ** 2]), (x - y).abs()
        m = _torch_worst(s4, e)[0]
        s4[:, -1], e[-1] = s4[:, m], e[m]  # the lowest cosine twice: the first one is the worst slice
        for s, ee in ((s4, e), (s4[:, ::2], e[::2]), (s4[:, 1:], e[1:])):
            assert _same(loops.worst_slice(s, ee), _torch_worst(s, ee)), k

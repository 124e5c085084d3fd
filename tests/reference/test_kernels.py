"""The reference kernels against independent formulations (float64 math, explicit tables, numpy loops)."""

import itertools
import math

import numpy as np
import pytest
import torch

from parity.formats import E2M1_VALUES, fp4_to_float
from parity.reference import kernels

torch.manual_seed(42)


def _bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


# ---- e4m3 / e2m1 rounding, written from the format definitions -----------------------------------------------


def _e4m3_grid() -> np.ndarray:
    """All finite non-negative e4m3 values (bias 7, 3 mantissa bits, subnormals; 0x7f is NaN)."""
    vals = [m / 8 * 2.0**-6 for m in range(8)]  # subnormals incl. 0
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return np.array(sorted(vals))


def _rne_on_grid(v: np.ndarray, grid: np.ndarray, code_of) -> np.ndarray:
    """Nearest grid magnitude, ties to the even code, sign kept, saturating at the grid max (float64)."""
    a = np.minimum(np.abs(v), grid[-1])
    hi = np.clip(np.searchsorted(grid, a), 0, len(grid) - 1)
    lo = np.clip(hi - 1, 0, len(grid) - 1)
    d_lo, d_hi = a - grid[lo], grid[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (code_of(hi) % 2 == 0))
    return np.copysign(np.where(pick_hi, grid[hi], grid[lo]), v)


def ref_e4m3(v: np.ndarray) -> np.ndarray:
    return _rne_on_grid(v, _e4m3_grid(), lambda i: i)


def ref_e2m1(v: np.ndarray) -> np.ndarray:
    return _rne_on_grid(v, np.array(E2M1_VALUES[:8]), lambda i: i)


def ref_pow2_ceil(v: np.ndarray) -> np.ndarray:
    """2^ceil(log2 v) with frexp (mantissa in [0.5, 1)); exact for float32 inputs."""
    m, e = np.frexp(v.astype(np.float64))
    return np.ldexp(1.0, np.where(m == 0.5, e - 1, e))


# ---- act_quant -------------------------------------------------------------------------------------------------


def ref_act_quant(x: torch.Tensor, block: int):
    xf = x.float().numpy().astype(np.float64).reshape(*x.shape[:-1], -1, block)
    amax = np.maximum(np.abs(xf).max(-1, keepdims=True), np.float32(1e-4))
    v = (amax.astype(np.float32) * np.float32(1 / 448)).astype(np.float32)
    s = ref_pow2_ceil(v)
    q = ref_e4m3(np.clip(xf / s, -448, 448))
    return q.reshape(x.shape), s[..., 0]


ACT_CASES = [(1, 128, 128), (3, 5, 256), (7, 64, 64), (2, 384, 128)]


@pytest.mark.parametrize(
    ("b", "s", "n", "block"),
    [pytest.param(*c, 128 if c[2] % 128 == 0 else 64, id="b{}-s{}-n{}".format(*c)) for c in ACT_CASES],
)
def test_act_quant(b, s, n, block):
    x = _bf16(b, s, n, scale=3.0, seed=n + s)
    # spread magnitudes over many binades so scales differ between groups
    x = (x.float() * torch.exp2(torch.randint(-20, 20, (b, s, 1)).float())).to(torch.bfloat16)
    y, sc = kernels.act_quant(x, block, "ue8m0", torch.float8_e8m0fnu)
    q_ref, s_ref = ref_act_quant(x, block)
    assert y.dtype == torch.float8_e4m3fn and sc.dtype == torch.float8_e8m0fnu
    assert np.array_equal(y.float().numpy(), q_ref)
    assert np.array_equal(sc.float().numpy(), s_ref)


@pytest.mark.parametrize(
    ("amax", "scale"),
    [(448.0, 1.0), (450.0, 2.0), (1.0, 2.0**-8), (0.0, 2.0**-22), (1e-9, 2.0**-22), (57344.0, 128.0)],
)
def test_act_quant_known_scales(amax, scale):
    x = torch.zeros(1, 128, dtype=torch.bfloat16)
    x[0, 3] = amax
    _, s = kernels.act_quant(x, 128, "ue8m0", torch.float32)
    assert s.item() == scale


def test_act_quant_inplace_revisions_on_a_view():
    kv = _bf16(2, 9, 512, scale=2.0, seed=1)
    rope = kv[..., -64:].clone()
    current, initial = kv.clone(), kv.clone()
    kernels.act_quant(current[..., :-64], 64, "ue8m0", torch.float8_e8m0fnu, True)
    kernels.act_quant_initial(initial[..., :-64], 64, "ue8m0", torch.float8_e8m0fnu, True)
    q, s = kernels.act_quant(kv[..., :-64].contiguous(), 64, "ue8m0", torch.float32)
    expected = (q.float().unflatten(-1, (-1, 64)) * s[..., None]).flatten(-2).to(torch.bfloat16)
    assert torch.equal(current[..., :-64], expected)
    assert torch.equal(current[..., -64:], rope)  # the view's neighbours are untouched
    assert torch.equal(initial, kv)  # the initial revision's fake-quant is an identity
    assert not torch.equal(current, kv)


# ---- fp4_act_quant ----------------------------------------------------------------------------------------------

E2M1_TABLE = [
    (0.0, 0.0),
    (0.25, 0.0),
    (0.2500001, 0.5),
    (0.5, 0.5),
    (0.74, 0.5),
    (0.75, 1.0),
    (1.25, 1.0),
    (1.26, 1.5),
    (1.75, 2.0),
    (2.5, 2.0),
    (2.51, 3.0),
    (3.5, 4.0),
    (5.0, 4.0),
    (5.01, 6.0),
    (6.0, 6.0),
    (7.0, 6.0),
    (100.0, 6.0),
    (-0.25, -0.0),
    (-0.75, -1.0),
    (-2.5, -2.0),
    (-5.5, -6.0),
]


@pytest.mark.parametrize(("v", "expected"), [pytest.param(v, e, id=str(v)) for v, e in E2M1_TABLE])
def test_round_to_e2m1_table(v, expected):
    from parity.formats import round_to_e2m1

    got = round_to_e2m1(torch.tensor([v], dtype=torch.float32)).item()
    assert got == expected and math.copysign(1, got) == math.copysign(1, expected)


def test_round_to_e2m1_matches_nearest_even_everywhere():
    from parity.formats import round_to_e2m1

    grid = np.array(E2M1_VALUES[:8])
    mids = (grid[1:] + grid[:-1]) / 2
    v = np.concatenate([np.linspace(-8, 8, 20001), mids, -mids, np.nextafter(mids, 0), np.nextafter(mids, 9)])
    got = round_to_e2m1(torch.from_numpy(v.astype(np.float32))).numpy()
    assert np.array_equal(got, ref_e2m1(v.astype(np.float32)).astype(np.float32))


@pytest.mark.parametrize("shape", [(1, 32), (3, 7, 128), (2, 4, 64)], ids=str)
def test_fp4_act_quant(shape):
    x = _bf16(*shape, scale=4.0, seed=sum(shape))
    y, s = kernels.fp4_act_quant(x, 32)
    assert y.dtype == torch.float4_e2m1fn_x2 and y.shape[-1] == shape[-1] // 2
    xf = x.float().numpy().astype(np.float64).reshape(*shape[:-1], -1, 32)
    amax = np.maximum(np.abs(xf).max(-1, keepdims=True), 6 * 2.0**-126)
    s_ref = ref_pow2_ceil((amax.astype(np.float32) * np.float32(1 / 6)).astype(np.float32))
    q_ref = ref_e2m1(np.clip(xf / s_ref, -6, 6))
    assert np.array_equal(s.float().numpy(), s_ref[..., 0])
    assert np.array_equal(fp4_to_float(y.view(torch.uint8)).numpy().reshape(q_ref.shape), q_ref)
    # in place: the dequantized grid values, in bf16
    z = x.clone()
    kernels.fp4_act_quant(z, 32, True)
    assert np.array_equal(z.float().numpy(), (q_ref * s_ref).reshape(shape).astype(np.float32))


def test_e2m1_rne_codes_are_the_codes_of_round_to_e2m1():
    # the synthetic writer's one-pass codes (`formats.e2m1_rne_codes`) against the reference's two passes, on every
    # fp32 within 2^12 ulps of each edge and grid value (both signs), signed zeros, saturation and random values
    # (the whole fp32 range in [-8, 8] was checked once, 2026-12-05: the same codes everywhere)
    from parity.formats import E2M1_RNE_TABLE, e2m1_codes, e2m1_rne_codes, round_to_e2m1

    points = torch.tensor([e for e, _, _ in E2M1_RNE_TABLE] + list(E2M1_VALUES[:8]), dtype=torch.float32)
    around = (points.view(torch.int32)[:, None] + torch.arange(-4096, 4097, dtype=torch.int32)).clamp(min=0)
    x = torch.cat(
        [around.flatten().view(torch.float32), torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)) * 3]
    )
    x = torch.cat([x, -x, torch.tensor([0.0, -0.0, 6.5, -7.0, 1e30, -1e-30])])
    assert torch.equal(e2m1_rne_codes(x), e2m1_codes(round_to_e2m1(x)))
    assert torch.equal(e2m1_rne_codes(x.bfloat16()), e2m1_codes(round_to_e2m1(x.bfloat16())))


def test_fp4_packing_low_nibble_first():
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    x[0, 0], x[0, 1], x[0, 2] = 6.0, -0.5, 1.5  # amax 6 -> scale 1
    y, s = kernels.fp4_act_quant(x, 32)
    b = y.view(torch.uint8)[0]
    assert s.float().item() == 1.0
    assert b[0].item() == (0x7 | (0x9 << 4))  # 6.0 = code 7 low, -0.5 = code 9 high
    assert b[1].item() == 0x3  # 1.5 = code 3, then +0


# ---- Hadamard ---------------------------------------------------------------------------------------------------


def sylvester(d: int) -> np.ndarray:
    i = np.arange(d)
    return np.array([[(-1) ** bin(a & c).count("1") for c in i] for a in i], dtype=np.float64)


@pytest.mark.parametrize("d", [2, 16, 128])
def test_hadamard_matches_sylvester_exactly_on_integers(d):
    # small integers: every butterfly sum is exact, so the order cannot matter and the result is H x exactly
    x = torch.randint(-8, 8, (5, d)).to(torch.bfloat16)
    y = kernels.hadamard_transform(x, scale=1.0)
    assert np.array_equal(y.float().numpy(), x.float().numpy().astype(np.float64) @ sylvester(d).T)


def _butterfly_numpy(x: np.ndarray, scale: float) -> np.ndarray:
    """fp32 butterflies over index pairs (i, i + h) with h = 1, 2, 4, ...: the CUDA kernel's stage order."""
    y = x.astype(np.float32).copy()
    d = y.shape[-1]
    h = 1
    while h < d:
        for i in range(d):
            if i & h == 0:
                lo, hi = y[..., i].copy(), y[..., i + h].copy()
                y[..., i], y[..., i + h] = lo + hi, lo - hi
        h *= 2
    return y * np.float32(scale)


def test_hadamard_stage_order_random():
    x = _bf16(6, 128, seed=3)
    y = kernels.hadamard_transform(x, scale=128**-0.5)
    ref = torch.from_numpy(_butterfly_numpy(x.float().numpy(), 128**-0.5)).to(torch.bfloat16)
    assert torch.equal(y, ref)
    # and close to the exact transform (a different order of sums differs in the last bits only)
    exact = x.double().numpy() @ sylvester(128).T * 128**-0.5
    assert np.abs(y.double().numpy() - exact).max() <= 2.0**-7 * np.abs(exact).max()


# ---- GEMMs ------------------------------------------------------------------------------------------------------


def ref_blocked_gemm(a, sa, w, sb_of, block):
    """numpy: fp32 accumulation over K blocks of exactly computed block products (the documented structure)."""
    a64, w64 = a.astype(np.float64), w.astype(np.float64)
    m, n = a.shape[0], w.shape[0]
    acc = np.zeros((m, n), dtype=np.float32)
    for k in range(a.shape[1] // block):
        p = (a64[:, k * block : (k + 1) * block] @ w64[:, k * block : (k + 1) * block].T).astype(np.float32)
        acc = (acc + sb_of(p, k)).astype(np.float32)
    return acc


GEMM_CASES = [(1, 128, 128), (5, 200, 256), (33, 130, 384), (64, 256, 512)]


@pytest.mark.parametrize(("m", "n", "k"), [pytest.param(*c, id="M{}-N{}-K{}".format(*c)) for c in GEMM_CASES])
def test_fp8_gemm(m, n, k):
    from parity.formats import quantize_fp8_blocks

    x = _bf16(m, k, seed=m + k)
    w, w_s = quantize_fp8_blocks(torch.randn(n, k) * k**-0.5)
    a, a_s = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    c = kernels.fp8_gemm(a, a_s, w, w_s, torch.float8_e8m0fnu)
    # outputs take torch's default dtype (bf16 when the model runs); the values are always bf16
    assert c.dtype == torch.get_default_dtype() and c.shape == (m, n)
    sa, sb = a_s.float().numpy(), w_s.float().numpy()
    sb_rows = np.repeat(sb, 128, axis=0)[:n]
    ref = ref_blocked_gemm(
        a.float().numpy(), sa, w.float().numpy(), lambda p, kb: p * (sa[:, kb, None] * sb_rows[None, :, kb]), 128
    )
    assert torch.equal(c, torch.from_numpy(ref).to(torch.bfloat16).to(c.dtype))
    # sanity against the exact product of the dequantized operands: bf16 output rounding dominates
    exact = (a.double() * a_s.double().repeat_interleave(128, -1)) @ (
        w.double() * torch.from_numpy(sb_rows).double().repeat_interleave(128, -1)[:, :k]
    ).T
    assert (c.double() - exact).abs().max() <= 2**-7 * exact.abs().max()


@pytest.mark.parametrize(("m", "n", "k"), [pytest.param(*c, id="M{}-N{}-K{}".format(*c)) for c in GEMM_CASES])
def test_fp4_gemm(m, n, k):
    from parity.formats import quantize_fp4_groups

    x = _bf16(m, k, seed=m * k)
    w_packed, w_s = quantize_fp4_groups(torch.randn(n, k) * k**-0.5)
    w = w_packed.view(torch.float4_e2m1fn_x2)
    a, a_s = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    c = kernels.fp4_gemm(a, a_s, w, w_s, torch.float8_e8m0fnu)
    sa, sb = a_s.float().numpy(), w_s.float().numpy()
    wv = fp4_to_float(w_packed).numpy()
    ref = ref_blocked_gemm(
        a.float().numpy(), sa, wv, lambda p, kb: (p * sa[:, kb // 4, None]).astype(np.float32) * sb[None, :, kb], 32
    )
    assert torch.equal(c, torch.from_numpy(ref).to(torch.bfloat16).to(c.dtype))


def test_gemm_asserts_contiguity():
    a, a_s = kernels.act_quant(_bf16(4, 256), 128, "ue8m0", torch.float8_e8m0fnu)
    w = torch.zeros(256, 128, dtype=torch.float8_e4m3fn).t()
    with pytest.raises(AssertionError, match="contiguous"):
        kernels.fp8_gemm(a, a_s, w, torch.ones(1, 2, dtype=torch.float8_e8m0fnu))


# ---- sparse attention ---------------------------------------------------------------------------------------------


def dense_attention_f64(q, kv, sink, idx, scale):
    """Softmax over the listed slots plus the sink logit, all float64 (no blocks, no bf16 P)."""
    b, m, h, d = q.shape
    out = torch.zeros(b, m, h, d, dtype=torch.float64)
    for bi, mi in itertools.product(range(b), range(m)):
        slots = [int(i) for i in idx[bi, mi] if i >= 0]
        k = kv[bi, slots].double()  # [n, d]
        s = q[bi, mi].double() @ k.T * scale  # [h, n]
        logits = torch.cat([s, sink.double()[:, None]], dim=1)
        p = torch.softmax(logits, dim=1)
        out[bi, mi] = p[:, :-1] @ k
    return out


ATTN_CASES = [(1, 1, 4, 64, 10, 7), (2, 3, 16, 512, 140, 100), (1, 2, 1, 128, 300, 130)]


@pytest.mark.parametrize(
    ("b", "m", "h", "d", "n", "k"), [pytest.param(*c, id="b{}-m{}-h{}-d{}-n{}-k{}".format(*c)) for c in ATTN_CASES]
)
def test_sparse_attn_vs_dense(b, m, h, d, n, k):
    g = torch.Generator().manual_seed(b * m + k)
    q = _bf16(b, m, h, d, seed=1)
    kv = _bf16(b, n, d, seed=2)
    sink = torch.randn(h, generator=g)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * m)]).view(b, m, k).int()
    idx[..., 1::3] = -1  # holes anywhere except the first slot
    o = kernels.sparse_attn(q, kv, sink, idx, d**-0.5)
    ref = dense_attention_f64(q, kv, sink, idx, d**-0.5)
    # P is rounded to bf16 before the value product (8 bits), the output to bf16
    assert o.dtype == torch.bfloat16
    assert (o.double() - ref).abs().max() <= 2**-7 * ref.abs().max()


def test_sparse_attn_single_block_structure():
    """One block: o = bf16(sum_j bf16(p_j) v_j / (sum_j p_j + exp(sink - max))), p_j = exp(s_j - max) in fp32."""
    q, kv = _bf16(1, 1, 2, 64, seed=5), _bf16(1, 9, 64, seed=6)
    sink = torch.tensor([0.3, -1.0])
    idx = torch.tensor([[[4, 0, -1, 8, 2]]], dtype=torch.int32)
    o = kernels.sparse_attn(q, kv, sink, idx, 0.125)
    k = kv[0, [4, 0, 8, 2]].double()
    s = (q[0, 0].double() @ k.T).float() * torch.tensor(0.125)  # [h, 4] fp32
    mx = s.max(-1).values
    p = torch.exp((s - mx[:, None]).double()).float()
    denom = p.double().sum(-1).float() + torch.exp((sink - mx).double()).float()
    num = (p.to(torch.bfloat16).double() @ k).float()
    assert torch.equal(o[0, 0], (num / denom[:, None]).to(torch.bfloat16))


def test_sparse_attn_ignores_memory_behind_minus_one():
    q, kv = _bf16(1, 1, 2, 64, seed=7), _bf16(1, 6, 64, seed=8)
    idx = torch.tensor([[[1, -1, 3]]], dtype=torch.int32)
    poisoned = kv.clone()
    poisoned[0, 0] = float("nan")  # idx -1 must never read slot 0 (or any slot)
    a = kernels.sparse_attn(q, kv, torch.zeros(2), idx, 0.125)
    b = kernels.sparse_attn(q, poisoned, torch.zeros(2), idx, 0.125)
    assert torch.equal(a, b) and b.isfinite().all()


# ---- mHC Sinkhorn -------------------------------------------------------------------------------------------------


def sinkhorn_f64(mixes, scale, base, hc, iters, eps):
    m = mixes.double().reshape(-1, (2 + hc) * hc)
    sc, bs = scale.double(), base.double()
    sig = lambda v: 1 / (1 + torch.exp(-v))
    pre = sig(m[:, :hc] * sc[0] + bs[:hc]) + eps
    post = 2 * sig(m[:, hc : 2 * hc] * sc[1] + bs[hc : 2 * hc])
    c = (m[:, 2 * hc :] * sc[2] + bs[2 * hc :]).view(-1, hc, hc)
    c = torch.softmax(c, -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return pre, post, c


@pytest.mark.parametrize(("b", "s"), [(1, 1), (2, 7), (3, 33)])
def test_hc_split_sinkhorn(b, s):
    g = torch.Generator().manual_seed(b * s)
    mixes = torch.randn(b, s, 24, generator=g) * 3
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    pre, post, comb = kernels.hc_split_sinkhorn(mixes, scale, base, 4, 20, 1e-6)
    assert pre.shape == (b, s, 4) and post.shape == (b, s, 4) and comb.shape == (b, s, 4, 4)
    rp, rq, rc = sinkhorn_f64(mixes, scale, base, 4, 20, 1e-6)
    # fp32 roundings over 20 iterations stay within a few ulp of the float64 iteration
    for got, ref in ((pre, rp), (post, rq), (comb, rc)):
        assert (got.double().reshape(ref.shape) - ref).abs().max() < 1e-5
    # column sums are ~1 after the final column normalization
    assert (comb.double().sum(-2) - 1).abs().max() < 1e-4


def test_hc_split_sinkhorn_single_iteration_exact():
    """iters=1: softmax + eps, one column normalization; checked with explicit fp32 rounding points."""
    mixes = torch.randn(1, 1, 24)
    scale, base = torch.tensor([1.0, 1.0, 0.75]), torch.randn(24)
    _, _, comb = kernels.hc_split_sinkhorn(mixes, scale, base, 4, 1, 1e-6)
    m = mixes[0, 0].numpy().astype(np.float64)
    c = (m[8:] * 0.75 + base.numpy()[8:].astype(np.float64)).astype(np.float32).reshape(4, 4)
    c = np.exp((c - c.max(-1, keepdims=True)).astype(np.float64)).astype(np.float32)
    c = (c / c.astype(np.float64).sum(-1, keepdims=True).astype(np.float32) + np.float32(1e-6)).astype(np.float32)
    c = (c / (c.astype(np.float64).sum(0, keepdims=True).astype(np.float32) + np.float32(1e-6))).astype(np.float32)
    assert np.array_equal(comb[0, 0].numpy(), c)


# ---- the fast paths, each against an independent formulation ------------------------------------------------------


def ref_pow2_ceil_bits(v: np.ndarray) -> np.ndarray:
    """The official fast_log2_ceil + fast_pow2 on fp32 bits, for every bit pattern (numpy uint32 arithmetic)."""
    u = v.astype(np.float32).view(np.uint32)
    e = ((u >> 23) & 0xFF) + ((u & 0x7FFFFF) != 0)  # 256 for NaN: the result bits are 0x80000000 (-0.0)
    return ((e << 23) & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def _all_bf16() -> torch.Tensor:
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


def test_pow2_ceil_every_bf16_pattern_and_specials():
    from parity.formats import pow2_ceil

    v = torch.cat([_all_bf16().float(), torch.randint(-(2**31), 2**31 - 1, (1 << 16,)).int().view(torch.float32)])
    got = pow2_ceil(v).numpy()
    assert np.array_equal(got.view(np.uint32), ref_pow2_ceil_bits(v.numpy()).view(np.uint32))
    pos = v.numpy()[(v.numpy() > 2.0**-126) & np.isfinite(v.numpy())]
    with np.errstate(over="ignore"):  # 2^128 is inf in fp32, for both
        assert np.array_equal(pow2_ceil(torch.from_numpy(pos)).numpy(), ref_pow2_ceil(pos).astype(np.float32))


def test_round_to_e2m1_every_bf16_pattern():
    from parity.formats import round_to_e2m1

    v = _all_bf16().float()
    finite = v.isfinite()
    got = round_to_e2m1(v)
    assert np.array_equal(got[finite].numpy(), ref_e2m1(v[finite].numpy()).astype(np.float32))
    assert np.array_equal(np.signbit(got.numpy()), np.signbit(v.numpy()))  # the sign is kept, also for 0 and NaN
    assert (got[~finite].abs() == 6).all()  # inf and NaN saturate (the official where-chain puts NaN at 6)


def test_fp4_to_float_every_byte():
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    expected = [(E2M1_VALUES[i & 0xF], E2M1_VALUES[i >> 4]) for i in range(256)]
    for dtype in (torch.uint8, torch.int8, torch.float4_e2m1fn_x2):
        got = fp4_to_float(b.view(dtype).view(16, 16)).view(256, 2)
        assert got.tolist() == [list(p) for p in expected]


@pytest.mark.parametrize(("floor", "max_inv", "block"), [(1e-4, 1 / 448, 128), (6 * 2.0**-126, 1 / 6, 32)])
def test_group_scales_of_every_bf16_absmax(floor, max_inv, block):
    """One group per bf16 magnitude (inf and every NaN too), as its absmax: the scales (fp32 and e8m0) and the
    quantized values against the numpy formula (act_quant and fp4_act_quant look the scale up in a table)."""
    mags = torch.arange(1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = torch.zeros(1 << 15, block, dtype=torch.bfloat16)
    x[:, 0] = mags
    x[:, 1] = -mags * 0.75  # smaller magnitude, other sign
    x[1::2, 0] *= -1
    amax = np.abs(mags.float().numpy())
    with np.errstate(invalid="ignore"):
        s_ref = ref_pow2_ceil_bits((np.maximum(amax, np.float32(floor)) * np.float32(max_inv)).astype(np.float32))
    if block == 128:
        y, s = kernels.act_quant(x, block, "ue8m0", torch.float32)
        _, s8 = kernels.act_quant(x, block, "ue8m0", torch.float8_e8m0fnu)
        finite = np.isfinite(amax) & (amax > 0)
        xf = x.float().numpy()[finite]
        q_ref = ref_e4m3(np.clip(xf / s_ref[finite, None], -448, 448))
        assert np.array_equal(y.float().numpy()[finite], q_ref)
    else:
        _, s8 = kernels.fp4_act_quant(x, block)
        s = None
    if s is not None:
        assert np.array_equal(s.numpy()[:, 0].view(np.uint32), s_ref.view(np.uint32))
    # e8m0 holds the exponent field of the power-of-two scale (0 for the -0.0 of a NaN group, 255 for inf)
    assert np.array_equal(s8.view(torch.uint8).numpy()[:, 0], (s_ref.view(np.uint32) >> 23).astype(np.uint8))


def test_act_quant_strided_inputs_match_contiguous():
    x = _bf16(6, 256, scale=3.0, seed=9)
    for view in (x.t().contiguous().t(), x[:, :128], torch.stack([x, x], -1)[..., 0]):
        y, s = kernels.act_quant(view, 64, "ue8m0", torch.float8_e8m0fnu)
        y2, s2 = kernels.act_quant(view.contiguous(), 64, "ue8m0", torch.float8_e8m0fnu)
        assert torch.equal(y.view(torch.uint8), y2.view(torch.uint8)) and torch.equal(
            s.view(torch.uint8), s2.view(torch.uint8)
        )


# -- GEMMs: fp32 (not power-of-two) scales, chunking, odd shapes, and the weight memo following in-place writes --


def _gemm_ref(kind, a, a_s, w, w_s):
    sa = a_s.float().numpy().reshape(a.shape[0], -1)
    n = w.shape[0]
    if kind == "fp8":
        sb_rows = np.repeat(w_s.float().numpy(), 128, axis=0)[:n]
        return ref_blocked_gemm(
            a.float().numpy(), sa, w.float().numpy(), lambda p, kb: p * (sa[:, kb, None] * sb_rows[None, :, kb]), 128
        )
    sb = w_s.float().numpy()
    wv = fp4_to_float(w.view(torch.uint8)).numpy()
    return ref_blocked_gemm(
        a.float().numpy(), sa, wv, lambda p, kb: (p * sa[:, kb // 4, None]).astype(np.float32) * sb[None, :, kb], 32
    )


def _gemm(kind, a, a_s, w, w_s):
    return (kernels.fp8_gemm if kind == "fp8" else kernels.fp4_gemm)(a, a_s, w, w_s)


def _weights(kind, n, k, seed):
    from parity.formats import quantize_fp4_groups, quantize_fp8_blocks

    g = torch.Generator().manual_seed(seed)
    if kind == "fp8":
        return quantize_fp8_blocks(torch.randn(n, k, generator=g) * k**-0.5)
    w, s = quantize_fp4_groups(torch.randn(n, k, generator=g) * k**-0.5)
    return w.view(torch.float4_e2m1fn_x2), s


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 1, 128), (2, 100, 256), (7, 200, 384), (129, 130, 256)])
def test_gemm_fp32_scales_against_blocked_formula(kind, m, n, k):
    # scale_fmt None: activation scales are amax / 448, not powers of two; fp32 weight scales too (fp8)
    a, a_s = kernels.act_quant(_bf16(m, k, scale=5.0, seed=m + n), 128, None, torch.float32)
    w, w_s = _weights(kind, n, k, seed=k)
    if kind == "fp8":
        w_s = torch.rand(w_s.shape, generator=torch.Generator().manual_seed(n)) + 0.3
    c = _gemm(kind, a, a_s, w, w_s)
    assert torch.equal(c, torch.from_numpy(_gemm_ref(kind, a, a_s, w, w_s)).to(torch.bfloat16).to(c.dtype))


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_gemm_chunked_blocks_keep_the_order(kind, monkeypatch):
    a, a_s = kernels.act_quant(_bf16(9, 512, seed=4), 128, "ue8m0", torch.float8_e8m0fnu)
    w, w_s = _weights(kind, 70, 512, seed=5)
    whole = _gemm(kind, a, a_s, w, w_s)
    monkeypatch.setattr(kernels, "_GEMM_CHUNK_ELEMS", 9 * 70 * 3)  # 3 K-blocks per bmm
    assert torch.equal(_gemm(kind, a, a_s, w, w_s), whole)
    assert torch.equal(whole, torch.from_numpy(_gemm_ref(kind, a, a_s, w, w_s)).to(torch.bfloat16).to(whole.dtype))


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_gemm_weight_memo_follows_in_place_writes(kind):
    a, a_s = kernels.act_quant(_bf16(3, 256, seed=6), 128, "ue8m0", torch.float8_e8m0fnu)
    w, w_s = _weights(kind, 64, 256, seed=7)

    def check():
        c = _gemm(kind, a, a_s, w, w_s)
        assert torch.equal(c, torch.from_numpy(_gemm_ref(kind, a, a_s, w, w_s)).to(torch.bfloat16).to(c.dtype))

    check()
    w.view(torch.uint8)[3, :8] = 0x33  # through a view: the version counter is shared
    check()
    w_s.view(torch.uint8)[0, 0] += 1
    check()
    with torch.no_grad():
        w.copy_(_weights(kind, 64, 256, seed=8)[0])
    check()
    with torch.inference_mode():  # inference-mode weights have no version counter: never memoized, still right
        w, w_s = _weights(kind, 64, 256, seed=9)
        check()


def test_weight_memo_is_bounded_and_drops_dead_weights(monkeypatch):
    entry = 128 * 256 * 8 + 2 * 128 * 4  # one [128, 256] fp8 weight as float64 blocks, plus its scales
    cache = kernels._DerivedCache(4 * entry)  # an entry may take a quarter: room for four
    monkeypatch.setattr(kernels, "_WEIGHTS", cache)
    a, a_s = kernels.act_quant(_bf16(2, 256, seed=1), 128, "ue8m0", torch.float8_e8m0fnu)
    weights = [_weights("fp8", 128, 256, seed=i) for i in range(6)]
    for w, w_s in weights:
        c = kernels.fp8_gemm(a, a_s, w, w_s)
        assert torch.equal(c, torch.from_numpy(_gemm_ref("fp8", a, a_s, w, w_s)).to(torch.bfloat16).to(c.dtype))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache._entries) == 4
    del weights, w, w_s
    assert len(cache._entries) == 0 and cache.nbytes == 0


# -- Sinkhorn: an fp32 emulation with explicit rounding points (float64 sums are exact for these inputs) --


def sinkhorn_fp32_emulation(mixes, scale, base, hc, iters, eps):
    f32, f64 = np.float32, np.float64
    m = mixes.numpy().astype(f64).reshape(-1, (2 + hc) * hc)
    sc, bs = scale.numpy().astype(f64), base.numpy().astype(f64)
    e = f32(eps)

    def exp32(v):  # exp in float64 (torch's, the kernels' function), rounded to fp32
        return torch.exp(torch.from_numpy(v.astype(f64))).numpy().astype(f32)

    def sig(v):
        return (f32(1) / (exp32(-v) + f32(1))).astype(f32)

    pre = sig((m[:, :hc] * sc[0] + bs[:hc]).astype(f32)) + e
    post = f32(2) * sig((m[:, hc : 2 * hc] * sc[1] + bs[hc : 2 * hc]).astype(f32))
    c = (m[:, 2 * hc :] * sc[2] + bs[2 * hc :]).astype(f32).reshape(-1, hc, hc)
    c = exp32(c - c.max(-1, keepdims=True))
    c = c / c.sum(-1, keepdims=True, dtype=f64).astype(f32) + e
    c = c / (c.sum(-2, keepdims=True, dtype=f64).astype(f32) + e)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdims=True, dtype=f64).astype(f32) + e)
        c = c / (c.sum(-2, keepdims=True, dtype=f64).astype(f32) + e)
    return pre, post, c


@pytest.mark.parametrize(("b", "s"), [(1, 1), (2, 3), (1, 37)])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_hc_split_sinkhorn_against_fp32_emulation(b, s, iters):
    g = torch.Generator().manual_seed(b * s + iters)
    for _ in range(5):
        mixes = torch.randn(b, s, 24, generator=g) * 2
        scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
        got = kernels.hc_split_sinkhorn(mixes, scale, base, 4, iters, 1e-6)
        for x, ref in zip(got, sinkhorn_fp32_emulation(mixes, scale, base, 4, iters, 1e-6)):
            assert np.array_equal(x.numpy().reshape(ref.shape), ref)


def test_hc_split_sinkhorn_python_floats_match_torch_code(monkeypatch):
    """Small batches run on Python floats behind an exactness certificate; the torch code is the definition."""
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(1, 2, 24, generator=g) * sd, 20) for sd in (0.5, 3, 12, 40)]
    cases += [(torch.zeros(1, 1, 24), 20), (torch.randn(1, 1, 24, generator=g), 1)]
    cases += [(torch.tensor([0.0, 1, float("inf"), 2] * 6)[None, None], 20)]
    cases += [(torch.tensor([0.0, -16.635532, -36.7368, -36.7368] * 6)[None, None], 20)]  # order-sensitive sums
    scale, base = torch.rand(3, generator=g) + 0.5, torch.zeros(24)
    fast = [kernels.hc_split_sinkhorn(mx, scale, base, 4, it, 1e-6) for mx, it in cases]
    monkeypatch.setattr(kernels, "_SINKHORN_PY_MAX", -1)
    for (mx, it), got in zip(cases, fast):
        for x, y in zip(got, kernels.hc_split_sinkhorn(mx, scale, base, 4, it, 1e-6)):
            assert x.shape == y.shape and x.stride() == y.stride()
            assert torch.equal(x.view(torch.int32), y.view(torch.int32))


# -- sparse attention: a per-block float64 loop written from the spec, on inputs whose float64 sums are exact --


def sparse_attn_blocks_f64(q, kv, sink, idx, scale):
    """Per query: 64-slot blocks, running max, exp in float64 rounded to fp32, bf16 P, fp32 denominator
    fl32(l * alpha + sum p), fp32 accumulator fl32(fl32(acc * alpha) + P.V), sink last; every rounding explicit."""
    f32, f64 = np.float32, np.float64

    def exp32(v):
        return torch.exp(torch.from_numpy(np.asarray(v, dtype=f64))).numpy().astype(f32)

    b, m, h, d = q.shape
    out = np.zeros((b, m, h, d), dtype=f32)
    for bi, mi in itertools.product(range(b), range(m)):
        qq = q[bi, mi].double().numpy()
        row_max, denom, acc = np.full(h, -np.inf, f32), np.zeros(h, f32), np.zeros((h, d), f32)
        slots = idx[bi, mi].tolist()
        for t0 in range(0, len(slots), 64):
            blk = slots[t0 : t0 + 64]
            valid = np.array([i >= 0 for i in blk])
            kv_blk = np.where(valid[:, None], kv[bi, [max(i, 0) for i in blk]].double().numpy(), 0.0)
            s = (qq @ kv_blk.T).astype(f32)
            with np.errstate(invalid="ignore"):
                s = np.where(valid[None, :], s, f32(-np.inf)) * f32(scale)
                new_max = np.maximum(row_max, s.max(-1))
                alpha = exp32(row_max - new_max)
                p = exp32(s - new_max[:, None])
            denom = (denom.astype(f64) * alpha + p.astype(f64).sum(-1).astype(f32)).astype(f32)
            pv = torch.from_numpy(p).to(torch.bfloat16).double().numpy() @ kv_blk
            acc = ((acc * alpha[:, None]).astype(f64) + pv).astype(f32)
            row_max = new_max
        denom = denom + exp32(sink.numpy() - row_max)
        out[bi, mi] = acc / denom[:, None]
    return torch.from_numpy(out).to(torch.bfloat16)


@pytest.mark.parametrize("k", [1, 37, 63, 64, 65, 130, 200])
@pytest.mark.parametrize("m", [1, 3])
def test_sparse_attn_blocks_exact(m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    n, h, d = 220, 4, 64
    # small integers / 8: q.k and P.V sums in float64 are exact, so the formula above is order-free
    q = (torch.randint(-4, 5, (1, m, h, d), generator=g) / 8).to(torch.bfloat16)
    kv = (torch.randint(-4, 5, (1, n, d), generator=g) / 8).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(m)])[None].int()
    idx[..., 1::5] = -1
    if k > 128:
        idx[..., 64:128] = -1  # a whole block of holes after the first
    sink = torch.randn(h, generator=g)
    got = kernels.sparse_attn(q, kv, sink, idx, 0.3)
    assert torch.equal(got, sparse_attn_blocks_f64(q, kv, sink, idx, 0.3))

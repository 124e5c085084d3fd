"""Triton `compress_pool`: per channel, a softmax over a block's positions weights its kv rows, summed.

Reference: parity.reference.model.Compressor.forward, `(kv * score.softmax(dim)).sum(dim)` over the r (or 2r with
the ratio-4 overlap) positions of a block, fp32 in and out (spec §6.2 step 7 in prefill, §6.3 in decode).

The twin is three fp32 torch kernels (softmax, product, sum) whose internal order is torch's and differs between CPU
and CUDA (the spec's op forms exist to pin it for the reference itself), so a kernel cannot reproduce their bits on
both. This one computes the exact math instead and rounds once: max over the positions, e_i = exp(s_i - max),
sum_i kv_i e_i / sum_i e_i, all in float64 with a portable exp (Cody-Waite reduction by ln 2, k rounded by adding
1.5 * 2^52, and a degree-13 Taylor polynomial, ~1 float64 ulp: the same code on the GPU and in the interpreter, no
libdevice), then one round to fp32. So every output is within 0.5 fp32 ulp (plus ~1e-15 relative) of the exact
pooling: never further from it than the twin's fp32 result plus 1 ulp (the tolerance the tests assert against a
float64 golden). An all -inf channel gives NaN like the twin's softmax.

Two kernels, by the number of positions w (the same math, so the same outputs within that bound; equal bit for bit
at every size timed):
- w <= `FEW_POSITIONS` (the CSA compressors' 8, decode's state rows): `_pool_pairs_kernel`, each thread its own
  (entry, channel) pairs over every position in two passes (the max, then the sums): no lane or warp exchanges;
- more (the HCA compressor's 128): `_pool_tile_kernel`, one program a `[entries, positions, channels]` tile with
  the positions reduced across lanes, where one thread's serial loop over 128 positions would be latency-bound.
Measured on an H100 (docs/perf.md, twenty-sixth pass), against the tile kernel alone: CSA prefill 16384 tokens
92.4 -> 71.0 us (51 -> 66 % of copy bandwidth), decode batch 256 12.5 -> 10.7 us; the pairs kernel on HCA prefill
16384 was 49.8 -> 95.3 us, hence the split.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime

# (constexpr: a compiled kernel may only read constexpr globals)
INV_LN2 = tl.constexpr(1.4426950408889634)
# fdlibm's split of ln 2: the high part has 21 trailing zero bits, so k * LN2_HI is exact for |k| < 2^20
LN2_HI = tl.constexpr(6.93147180369123816490e-01)
LN2_LO = tl.constexpr(1.90821492927058770002e-10)
ROUNDER = tl.constexpr(6755399441055744.0)  # 1.5 * 2^52: x + ROUNDER - ROUNDER rounds x to an integer
# up to this many positions a block is pooled by one thread per (entry, channel) (module docstring); measured at 8
# (faster than the tile kernel) and 128 (2x slower)
FEW_POSITIONS = 16


@triton.jit
def exp_f64(x):
    """exp of float64 x (x <= 709), ~1 ulp; NaN stays NaN, x < -700 gives 0 (far below any fp32 result)."""
    xc = tl.maximum(x, -700.0)
    # k = round(xc / ln 2) by adding 1.5 * 2^52 (the sum's low bits hold k; two adds where floor and a float ->
    # int conversion are slow-pipe instructions); ties go to even, |r| <= ln2 / 2 either way
    kk = xc * INV_LN2 + ROUNDER
    k = kk - ROUNDER
    r = (xc - k * LN2_HI) - k * LN2_LO  # |r| <= ln2 / 2 (+ a few ulp)
    # Taylor to degree 13: the remainder r^14 / 14! < 2^-56 for |r| <= 0.35
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # 2^k: k + 1023 into the exponent field (the rounder's own bits shift out past bit 63)
    two_k = ((kk.to(tl.int64, bitcast=True) + 1023) << 52).to(tl.float64, bitcast=True)
    y = tl.where(x < -700.0, 0.0, p * two_k)
    return tl.where(x != x, x, y)


@triton.jit
def softmax_pool(kv, s, AXIS: tl.constexpr):
    """float64 kv and scores -> per channel, sum over the positions (axis AXIS) of kv * e / sum e, e = exp(s - max):
    the pooling in float64, not yet rounded."""
    e = exp_f64(s - tl.expand_dims(tl.max(s, axis=AXIS), AXIS))
    return tl.sum(kv * e, axis=AXIS) / tl.sum(e, axis=AXIS)


@triton.jit(do_not_specialize=["N"])  # the blocks a step completes: a per-step count
def _pool_pairs_kernel(
    kv_ptr, sc_ptr, out_ptr, N, W, C,
    kv_sn, kv_sw, sc_sn, sc_sw,
    BN: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    # each thread owns its (entry, channel) pairs over every position: no lane or warp exchanges, and a pair's
    # result does not depend on the tile (batch invariance)
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC).to(tl.int64)
    mask = (n < N)[:, None] & (c < C)[None, :]
    sc_row = sc_ptr + n[:, None] * sc_sn + c[None, :]
    kv_row = kv_ptr + n[:, None] * kv_sn + c[None, :]
    # pass 1: the max over the positions (NaN propagates, as the twin's softmax)
    m = tl.full([BN, BC], float("-inf"), tl.float32)
    for w in range(0, W):
        m = tl.maximum(
            m, tl.load(sc_row + w * sc_sw, mask=mask, other=float("-inf")), propagate_nan=tl.PropagateNan.ALL
        )
    m = m.to(tl.float64)  # exact: the fp32 max is the float64 max of the converted scores
    # pass 2: e = exp(s - max), sum kv e and sum e in float64 (the scores again, from L1)
    num = tl.zeros([BN, BC], tl.float64)
    den = tl.zeros([BN, BC], tl.float64)
    for w in range(0, W):
        s = tl.load(sc_row + w * sc_sw, mask=mask, other=float("-inf")).to(tl.float64)
        kv = tl.load(kv_row + w * kv_sw, mask=mask, other=0.0).to(tl.float64)
        e = exp_f64(s - m)
        num += kv * e
        den += e
    tl.store(out_ptr + n[:, None] * C + c[None, :], (num / den).to(tl.float32), mask=mask)


@triton.jit(do_not_specialize=["N"])  # the blocks a step completes: a per-step count
def _pool_tile_kernel(
    kv_ptr, sc_ptr, out_ptr, N, W, C,
    kv_sn, kv_sw, sc_sn, sc_sw,
    WP: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    w = tl.arange(0, WP).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BC + tl.arange(0, BC).to(tl.int64)
    mask = (n < N)[:, None, None] & (w < W)[None, :, None] & (c < C)[None, None, :]
    # padding positions: score -inf (weight 0), kv 0
    s = tl.load(sc_ptr + n[:, None, None] * sc_sn + w[None, :, None] * sc_sw + c[None, None, :], mask=mask,
                other=float("-inf")).to(tl.float64)  # fmt: skip
    kv = tl.load(kv_ptr + n[:, None, None] * kv_sn + w[None, :, None] * kv_sw + c[None, None, :], mask=mask,
                 other=0.0).to(tl.float64)  # fmt: skip
    out = softmax_pool(kv, s, 1)  # [BN, BC]
    omask = (n < N)[:, None] & (c < C)[None, :]
    tl.store(out_ptr + n[:, None] * C + c[None, :], out.to(tl.float32), mask=omask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    w, c = t.shape[-2:]
    v = t.reshape(-1, w, c)
    return v if v.stride(-1) == 1 else v.contiguous()


def compress_pool(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The `CompressPool` contract: fp32 `[..., w, d]` x2 -> fp32 `[..., d]`."""
    assert kv.shape == score.shape, (kv.shape, score.shape)
    *lead, w, c = kv.shape
    out = torch.empty(*lead, c, dtype=torch.float32, device=kv.device)
    kv3, sc3 = _as_3d(kv), _as_3d(score)
    n = kv3.shape[0]
    if n == 0 or c == 0:
        return out
    if w == 0:  # an empty softmax sums to nothing (the twin gives zeros)
        return out.zero_()
    strides = (kv3.stride(0), kv3.stride(1), sc3.stride(0), sc3.stride(1))
    if w > FEW_POSITIONS:
        wp = runtime.next_pow2(w)
        budget = 1 << 15 if runtime.interpreting() else 2048
        bc = min(runtime.next_pow2(c), max(16, budget // wp))
        bn = min(max(1, budget // (wp * bc)), runtime.next_pow2(n))
        grid = (runtime.cdiv(n, bn), runtime.cdiv(c, bc))
        _pool_tile_kernel[grid](kv3, sc3, out, n, w, c, *strides, WP=wp, BN=bn, BC=bc)
        return out
    # 4 channels a thread (16-byte loads), up to 512 pairs a program; smaller tiles while the grid would leave the
    # SMs short of four programs each (a decode step of a few requests), down to one pair a thread
    if runtime.interpreting():
        bc = runtime.next_pow2(c)
        bn = min(max(1, (1 << 15) // bc), runtime.next_pow2(n))
    else:
        bc = min(runtime.next_pow2(c), 512)
        bn = min(max(1, 512 // bc), runtime.next_pow2(n))
        want = 4 * runtime.sm_count(kv.device)
        while bn * bc > 128 and runtime.cdiv(n, bn) * runtime.cdiv(c, bc) < want:
            bn, bc = (bn // 2, bc) if bn > 1 else (bn, bc // 2)
    grid = (runtime.cdiv(n, bn), runtime.cdiv(c, bc))
    _pool_pairs_kernel[grid](kv3, sc3, out, n, w, c, *strides, BN=bn, BC=bc)
    return out

"""The per-query math both `sparse_attn` kernels share (the Triton kernel in `sparse_attn.py`, the Gluon one in
`sparse_attn_wgmma.py`): elementwise `@triton.jit` functions, which a Gluon kernel can call on its laid-out tensors.
The rounding they implement is described in `sparse_attn.py`."""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

BLOCK_N = 64  # the official kernel's top-k block: the running max and the bf16 P are per 64 slots

# (constexpr: a compiled kernel may only read constexpr globals)
LOG2E = tl.constexpr(1.4426950408889634)
# ln 2 split for fp32 Cody-Waite: the high part has 12 trailing zero bits (k * LN2_HI_F exact for |k| < 2^12)
LN2_HI_F = tl.constexpr(0.693145751953125)
LN2_LO_F = tl.constexpr(1.428606765330187045e-06)


@triton.jit
def _exp_parts(xc):
    """exp(xc) = p * 2^k for fp32 xc in [-87.3, 88.72]: Cody-Waite reduction by a split ln 2, then Taylor to degree 7
    (the remainder r^8 / 8! < 2^-27 for |r| <= 0.35)."""
    k = tl.floor(xc * LOG2E + 0.5)  # >= -126: 2^k is normal
    r = (xc - k * LN2_HI_F) - k * LN2_LO_F  # |r| <= ln2 / 2 (+ rounding)
    p = 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    return p, k


@triton.jit
def exp_f32(x):
    """exp of fp32 x, ~1 ulp of the correctly rounded value; x < -87.3 (results below 1.2e-38) and -inf give 0,
    x > 88.72 and +inf give +inf, NaN stays NaN."""
    p, k = _exp_parts(tl.minimum(tl.maximum(x, -87.3), 88.72))
    # 2^k in two factors (2^(k-1) * 2 for k > 0), so k = 128 (x just under 88.72) does not overflow the bits
    up = (k > 0).to(tl.int32)
    y = p * ((k.to(tl.int32) - up + 127) << 23).to(tl.float32, bitcast=True) * (1 + up).to(tl.float32)
    y = tl.where(x < -87.3, 0.0, y)
    y = tl.where(x > 88.72, float("inf"), y)  # +inf (an empty row's sink - -inf) too
    return tl.where(x != x, x, y)


@triton.jit
def exp_nonpos(x):
    """`exp_f32` of x <= 0 (or NaN), bit for bit, without its overflow branches (k <= 0: 2^k is one factor, and the
    product by 1 it drops is exact). The softmax's arguments s - m_new and m - m_new never exceed 0 (m_new is the
    running max), so the kernels' loops take this one: per score a clamp, a compare, a select and the second factor
    fewer."""
    p, k = _exp_parts(tl.maximum(x, -87.3))
    y = p * ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    y = tl.where(x < -87.3, 0.0, y)
    return tl.where(x != x, x, y)


@triton.jit
def expf_cuda(x):
    """CUDA's `expf` (libdevice `__nv_expf`: a Cody-Waite step and one MUFU.EX2, at most 2 ulp from the correctly
    rounded exp): the exp the official TileLang kernel calls (spec §8 step 6) and torch's on CUDA. About 10
    instructions where `exp_nonpos` takes 20; compiled kernels only (the interpreter has no libdevice), so the Gluon
    kernel takes it and the Triton kernel, which must give the interpreter's bits, does not. Not flushed to zero:
    results below 2^-126 are torch's subnormals (`exp_nonpos` gives 0 below -87.3); test_attn_common.py checks every
    result against torch.exp bit for bit (passed on an H100, torch 2.11, Triton 3.6)."""
    return libdevice.exp(x)


@triton.jit
def n_blocks(idx_rows, tmask, K, BN: tl.constexpr, lanes):
    """64-slot blocks to run per query ([BT] index-row pointers): up to the last valid slot, at least one when the
    list is not empty (a row without any valid slot runs one block and gives the twin's NaN). Counted here rather
    than by torch ops on the host: each of those is a launch, and launches bound the small decode batches.
    `lanes` is `arange(0, CH)`, the slots read at a time, passed in so that a Gluon kernel can give its layout."""
    CH: tl.constexpr = lanes.shape[0]
    last = tl.where(tmask, 0, 0)
    for c0 in range(0, K, CH):
        sl = c0 + lanes
        r = tl.load(idx_rows[:, None] + sl[None, :], mask=tmask[:, None] & (sl < K)[None, :], other=-1)
        last = tl.maximum(last, tl.max(tl.where(r >= 0, sl[None, :] + 1, 0), axis=1))
    return tl.where(tmask, tl.maximum((last + BN - 1) // BN, tl.minimum(K, 1)), 0)


@triton.jit
def row_address(r, s0, s1, s2, s3, c1, c2, c3, st0, st1, st2, st3):
    """The address of virtual row r (int64) in its source: ids [0, c1) are source 0's rows, [c1, c2) source 1's, ..."""
    return tl.where(r < c1, s0 + r * st0,
           tl.where(r < c2, s1 + (r - c1) * st1,
           tl.where(r < c3, s2 + (r - c2) * st2, s3 + (r - c3) * st3)))  # fmt: skip

"""Triton grouped output LoRA (wo_a): out[t, g, :] = o[t, g, :] . wo_a[g]^T, FP8 weights with 128x128 block scales,
bf16 activations, fp32 accumulation, bf16 out.

Reference: parity.reference.model.Attention.forward (`einsum("bsgd,grd->bsgr")`, spec §5.6).

How the FP8 weights reach the kernel without changing the model: the model holds the bf16 wo_a that convert.py
made by dequantizing the checkpoint's FP8 weight exactly (spec §2.3: e4m3 x 2^k per 128x128 block fits bf16).
`quantize_wo_a` runs the checkpoint's own block recipe (`parity.formats.quantize_fp8_blocks`: power-of-two ue8m0
scale = pow2_ceil(max(amax, 1e-4) * fl32(1/448)), e4m3 round to nearest even) on the bf16 weight once per weight
tensor (cached on the tensor's identity, storage and version) and keeps the result only if it dequantizes back to
the bf16 weight bit for bit. What comes back for a checkpoint-made weight (tests/optimized/ops/test_o_lora.py proves
it on the synthetic checkpoint and on edge-case blocks): always the same values; the checkpoint's very bytes and
scales for every block except one whose largest |q| is exactly 224. Such a block's values are 224 * 2^k at most,
which the recipe itself may have stored as (224, 2^k) or as (448, 2^(k-1)) (both occur: the first for a master
amax just above 224 * 2^k, the second just below 448 * 2^(k-1)); the values cannot tell them apart, and the
recovery gives (448, 2^(k-1)). The kernel is blind to that choice: it multiplies the same bf16 values. A weight
that is not FP8-representable (random bf16 weights) falls back, with a warning, to the same kernel reading bf16.

Activations stay bf16: the kernel dequantizes each FP8 weight tile in registers to the exact bf16 values the
einsum multiplies (e4m3 * 2^k, exact), so both compute sum_d o[t, d] * w[r, d] over the same bf16 products with
fp32 accumulation; only the summation order differs (one chained fp32 accumulator over K here, cuBLAS's blocking
there). Result: within the twin's distance to the float64 einsum plus one bf16 ulp plus a K * 2^-23 fp32
accumulation allowance of the terms' absolute sum. FP8-quantized activations would halve the MMA time at large M
but add an FP8 rounding the reference does not have.

The compiled kernel dequantizes with bit moves (`E4M3_BF16_PTX`: e4m3 bits placed in a bf16, one bf16 multiply
by the scale, 2 instructions per weight against 3 through fp16 and fp32); weights with a scale byte above
MAX_BITS_SCALE, and the interpreter (no PTX), take the fp32 multiply. Both give the same bf16 for every e4m3 code
(tests: the PTX text executed on the CPU against the checkpoint dequantization; on the H200 both paths bitwise).

Decode (T <= 64) streams the FP8 weight, half the bytes. Prefill is MMA-bound and reads the bf16 wo_a the model
holds: the same bf16 values in the same chained accumulation, so a token's bits do not depend on which path its
batch takes (tests: rows do not depend on batchmates), without dequantizing each weight tile again for every token
tile. Split-K over the G x rank/64 decode tiles was measured and dropped: 18.0 against 19.3 us at G 8 on the H200,
for a second accumulator that made the prefill tiles 1.5x slower. Also measured and dropped (session 5): the
operands swapped for decode (tokens on wgmma's M side, 16- and 32-row weight tiles, 256-512 programs: 1.3-3x
slower, each program's 64-token tile is most of its shared-memory traffic) and 8 warps per 64-row tile (slower at
every shape).

FP8 tiles are multiplied one 128-column scale block at a time (two dots per 256-wide K step, chained into the one
accumulator in the same K order); when rank is a multiple of 128 a 64-row tile lies in one 128-row scale block and
takes one scale per dot, a scalar factor (compiled for sm_90: 428 against 635 instructions per 256-wide step of the
64 x 16 tile, 128 against 176 registers; the same time on the H100, which streams the weight at 78-100 % of its
copy rate there). Decode launches take a fixed tile per shape (`decode_config`), not the autotuner's pick.

Layout: weight rows (rank outputs of one group) are the MMA's M side, tokens its N side, so the dequantized weight
tile is wgmma's register operand and the same instruction serves 1 and 4096 tokens. `segments` is ignored: the
kernel's per-token result does not depend on the rows around it. The CPU interpreter sums each K block as a float64
dot of the exact bf16 products, rounded once to fp32 (numpy's fp32 GEMM would make a token's bits depend on its
position in the tile). Performance against the issue's targets: docs/perf-h200/triton_gemm.md.
"""

import warnings

import torch
import triton
import triton.language as tl

from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks
from parity.optimized.ops import weight_cache
from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import runtime

FP8_BLOCK = 128


def quantize_wo_a(w: torch.Tensor):
    """bf16 wo_a `[g*rank, K]` -> (e4m3 `[g*rank, K]`, e8m0 scales `[ceil(g*rank/128), ceil(K/128)]`) by the
    checkpoint's block recipe, or None when that does not reproduce `w` exactly (not an FP8-made weight)."""
    q, s = quantize_fp8_blocks(w.float())
    if not torch.equal(dequantize_fp8_blocks(q, s).to(torch.bfloat16), w):
        return None
    return q, s


# the largest e8m0 scale byte the bit-level dequantization takes: its bf16 factor 2^(E - 7) (the scale 2^(E - 127)
# times the 2^120 the bit move leaves out) must be a normal bf16, E + 120 <= 254; any real weight is far below
# (E 134 is a scale of 128: weights up to 57344)
MAX_BITS_SCALE = 134


def _fp8_weight(w: torch.Tensor):
    """The cached FP8 form of a bf16 wo_a (None: use the bf16 weight), computed once per tensor and version:
    (e4m3 weight, e8m0 scale bytes, whether every scale byte is <= MAX_BITS_SCALE)."""
    return weight_cache.converted("o_lora/triton fp8", w, _recover_fp8)


def _recover_fp8(w: torch.Tensor):
    fp8 = quantize_wo_a(w)
    if fp8 is None:
        warnings.warn(
            f"o_lora/triton: wo_a {tuple(w.shape)} is not an FP8 weight with 128x128 power-of-two block scales "
            "(not made from an FP8 checkpoint); the kernel reads it as bf16 instead (same math, twice the bytes)",
            stacklevel=4,
        )
        return None
    q, s = fp8
    s = s.view(torch.uint8)
    return q, s, bool(s.max() <= MAX_BITS_SCALE)  # once per weight: the host sync is not per call


# e4m3 bytes -> bf16 e4m3 * 2^(E - 127), four bytes per asm instance (two bf16x2 results). Per byte pair: `prmt`
# puts each byte in the low half of a 16-bit lane with its sign replicated over the high half; `shl` 4 and the mask
# keep the sign at bit 15 and the 7 magnitude bits at 10..4, which makes the bf16 e4m3 * 2^-120 for every finite
# code (bf16's exponent field takes e4m3's, so normals and subnormals both land 120 binades lower); `mul.rn.bf16x2`
# by 2^(E - 7) (exact: a power of two, bf16 keeps subnormals) gives the weight value. Compiled for sm_90: 635 against
# 825 instructions per 256-wide K step of the 64 x 16 decode tile (fp8 -> f16 -> f32, fp32 multiply, -> bf16 before)
E4M3_BF16_PTX = tl.constexpr("""{
        .reg .b32 t0, t1;
        prmt.b32 t0, $2, 0, 0x9180;
        shl.b32 t0, t0, 4;
        and.b32 t0, t0, 0x87F087F0;
        mul.rn.bf16x2 $0, t0, $3;
        prmt.b32 t1, $2, 0, 0xB3A2;
        shl.b32 t1, t1, 4;
        and.b32 t1, t1, 0x87F087F0;
        mul.rn.bf16x2 $1, t1, $4;
        }""")


@triton.jit
def e4m3_to_bf16_scaled(w, e):
    """e4m3 w [R, K] times 2^(e - 127) (e: e8m0 bytes [R, K] as int32, <= MAX_BITS_SCALE) -> bf16, exact."""
    factor = ((e + 120) << 7).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 2^(e - 7)
    return tl.inline_asm_elementwise(
        asm=E4M3_BF16_PTX,
        constraints="=r,=r,r,r,r",
        args=[w.to(tl.uint8, bitcast=True), factor],
        dtype=tl.bfloat16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _weight_tile(w_ptrs, mask_w, e, W_FP8: tl.constexpr, BITS: tl.constexpr):
    """One weight tile [BLOCK_W, <= 128 columns] as the bf16 the einsum multiplies: bf16 weights as loaded; FP8 ones
    times their block scale e (e8m0 bytes as int32, one per tile or [BLOCK_W, 1] per row; e4m3 * 2^k is exact in
    fp32 and in bf16)."""
    w = tl.load(w_ptrs, mask=mask_w, other=0.0)
    if W_FP8:
        if BITS:  # compiled: bit moves and one bf16 multiply (the interpreter runs no PTX)
            w = e4m3_to_bf16_scaled(w, tl.broadcast_to(e, w.shape))
        else:
            w = (w.to(tl.float32) * common.e8m0_to_f32(e)).to(tl.bfloat16)
    return w


@triton.jit(do_not_specialize=["T", "M_BUCKET"])
def _o_lora_kernel(
    o_ptr, w_ptr, s_ptr, out_ptr,
    T, R, KG, M_BUCKET,
    stride_ot, stride_wr, stride_sr, stride_outt,
    W_FP8: tl.constexpr, BITS: tl.constexpr, EVEN_K: tl.constexpr, DOT_F64: tl.constexpr, R_ALIGNED: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # grid: (rank tiles, token tiles, groups); M_BUCKET only keys the autotuner
    tl.static_assert(BLOCK_K <= 256, "a K step spans at most two 128-column weight scale blocks")
    # FP8 weights: one dot per 128-column scale block (KH wide), so a dot's weights share one scale column; the
    # dots chain into the one accumulator in ascending K as one wide dot would (the MMA sums K in 16-wide pieces
    # either way). TILE_SCALE: the tile's rows lie in one 128-row scale block (rank a multiple of 128, BLOCK_W
    # dividing 128), so a dot's weights share ONE scale: a scalar factor. Compiled for sm_90, the 64 x 16 decode
    # tile's 256-wide step: 428 instructions with one scale per tile, 495 with per-row scales, 635 for the one
    # 256-wide dot with its [BLOCK_W, BLOCK_K] factor tensor this replaced (9 barriers and one MMA fence per 16-wide
    # piece there, 5 barriers and one fence per dot here)
    KH: tl.constexpr = 128 if W_FP8 and BLOCK_K > 128 else BLOCK_K
    TILE_SCALE: tl.constexpr = W_FP8 and R_ALIGNED and (128 % BLOCK_W == 0)
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    g = tl.program_id(2)
    offs_r = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # rank outputs of group g
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, KH)
    mask_r = offs_r < R
    mask_t = offs_t < T
    rows = g * R + offs_r  # rows of the [g*rank, K] weight
    w_ptrs = w_ptr + rows[:, None] * stride_wr + offs_k[None, :]
    o_ptrs = o_ptr + offs_t[None, :] * stride_ot + (g * KG + offs_k)[:, None]  # [KH, BLOCK_T], K-major
    if TILE_SCALE:
        s_rows = s_ptr + ((g * R + pid_w * BLOCK_W) // 128) * stride_sr  # the tile's one 128-row scale block
        mask_s = True
    else:
        s_rows = s_ptr + ((rows // 128) * stride_sr)[:, None]  # per row (groups may straddle a block)
        mask_s = mask_r[:, None]
    acc = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    # the weight scales are read one K step ahead: a byte a row is too narrow for the pipeliner's async copies, and
    # a plain load in the step that uses it waits out a whole memory latency (compiled for sm_90, each step held one
    # or two such loads; at one 64-row program per SM that latency was most of the decode time)
    if W_FP8:
        e_next = tl.load(s_rows, mask=mask_s, other=127)
        if BLOCK_K > 128:
            e2_next = tl.load(s_rows + 1, mask=mask_s & (128 < KG), other=127)
    for k0 in range(0, KG, BLOCK_K):
        if W_FP8:
            e = e_next.to(tl.int32)
            k1 = k0 + BLOCK_K
            e_next = tl.load(s_rows + k1 // 128, mask=mask_s & (k1 < KG), other=127)
            if BLOCK_K > 128:  # the step's second 128 columns have their own scale block
                e2 = e2_next.to(tl.int32)
                e2_next = tl.load(s_rows + k1 // 128 + 1, mask=mask_s & (k1 + 128 < KG), other=127)
            else:
                e2 = e
        else:  # bf16 weights: no scale
            e = 0
            e2 = 0
        for h in tl.static_range(BLOCK_K // KH):
            if EVEN_K:
                mask_w = mask_r[:, None]
                mask_o = mask_t[None, :]
            else:
                mask_k = (k0 + h * KH + offs_k) < KG
                mask_w = mask_r[:, None] & mask_k[None, :]
                mask_o = mask_k[:, None] & mask_t[None, :]
            w = _weight_tile(w_ptrs + h * KH, mask_w, e if h == 0 else e2, W_FP8, BITS)
            o = tl.load(o_ptrs + h * KH, mask=mask_o, other=0.0)
            if DOT_F64:
                # interpreter: numpy's fp32 GEMM sums a column in an order that depends on its position in the
                # tile, which would make a token's bits depend on its batchmates; a float64 dot of the exact bf16
                # products, rounded once per dot, does not
                acc += tl.dot(w.to(tl.float64), o.to(tl.float64), input_precision="ieee").to(tl.float32)
            else:
                acc = tl.dot(w, o, acc)  # bf16 x bf16, fp32 accumulation chained over K
        w_ptrs += BLOCK_K
        o_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_t[None, :] * stride_outt + (g * R + offs_r)[:, None]
    tl.store(out_ptrs, acc.to(tl.bfloat16), mask=mask_r[:, None] & mask_t[None, :])


SMALL_M = 64  # decode-sized launches: the FP8 weight, 64-row slices; larger ones the bf16 weight, 128-row tiles


def _configs(small_m: bool):
    """Prefill's autotuned configurations; decode's candidates (what `bench/triton_gemm_sweep.py` times: decode
    launches take `decode_config`'s pick, not the autotuner's)."""
    if runtime.interpreting():
        return [triton.Config({"BLOCK_W": 128, "BLOCK_T": 256, "BLOCK_K": 128}, num_warps=4)]
    # (BLOCK_W, BLOCK_T, BLOCK_K, warps, stages), all wgmma, from the H200 tile sweep (bench/triton_gemm_sweep.py,
    # CUDA-graph timing, weights from HBM): decode streams the FP8 weight in 64-row slices, 256-wide K steps ~10 %
    # faster than 128-wide; prefill 128 x 256 tiles over the bf16 weight
    if small_m:
        # (deeper pipelines since the scales are read a step ahead)
        shapes = [(64, 16, 256, 4, 3), (64, 64, 256, 4, 3), (64, 16, 128, 4, 4)]
        shapes += [(64, 16, 256, 4, 5), (64, 16, 128, 4, 8)]
        shapes += [(64, 64, 128, 4, 4)]  # Pro (G 16) at 64 tokens: 39 against 45 us (bit dequantization, session 5)
    else:
        shapes = [(128, 256, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 8, 3)]
    return [
        triton.Config({"BLOCK_W": w, "BLOCK_T": t, "BLOCK_K": k}, num_warps=nw, num_stages=st)
        for w, t, k, nw, st in shapes
    ]


def decode_config(t: int, rank: int, n_groups: int, sms: int) -> dict:
    """The decode launch's tile and pipeline, fixed by shape (no autotuning). On the H100 (session 17,
    bench/triton_gemm_sweep.py, graph us, weights rotated from HBM) the autotuner picked configurations 33-40 %
    slower than the best at G 16 (16 tokens: 40.3 against 29.3 us; 64 tokens: 40.9 against 35.8). Why is not pinned
    down: it times each configuration on the one weight it is called with, replayed back to back (33.5 / 67 MB
    against a 50 MB L2), where a serving step streams every layer's weights from HBM. The picks below are the
    sweep's fastest (or within 1 % of it) at 1, 16 and 64 tokens for G 8 and G 16 on the H100; not re-swept on the
    H200.
    - up to 16 tokens: 16-token tiles, 256-wide K steps, 3 stages;
    - 17-64 tokens: 64-token tiles; 256-wide K steps need 192 registers (one program per SM), 128-wide ones 120
      (two). With more 64-row tiles than SMs (G 16: 256 tiles on 132 SMs) the narrow step runs them in one wave:
      35.8 against 41.2 us; with fewer (G 8: 128) the wide step is faster, 21.6 against 30.9 us."""
    if runtime.interpreting():
        return dict(_configs(True)[0].kwargs, num_warps=4)
    if t <= 16:
        return dict(BLOCK_W=64, BLOCK_T=16, BLOCK_K=256, num_warps=4, num_stages=3)
    wide = runtime.cdiv(rank, 64) * n_groups <= sms
    return dict(BLOCK_W=64, BLOCK_T=64, BLOCK_K=256 if wide else 128, num_warps=4, num_stages=3 if wide else 4)


_KEY = ["R", "KG", "M_BUCKET", "W_FP8", "BITS", "EVEN_K", "R_ALIGNED"]
_large = common.autotune(_configs(False), _KEY)(_o_lora_kernel)


def o_lora(
    o: torch.Tensor, wo_a: torch.Tensor, n_groups: int, rank: int, segments=None, *, _config: dict | None = None
) -> torch.Tensor:
    """Grouped output LoRA: o bf16 `[T, h*d]`, wo_a bf16 `[g*rank, h*d/g]` -> bf16 `[T, g, rank]`.
    `segments` is accepted for the op contract and ignored (rows are independent here). `_config` (tests and the
    bench): launch the kernel with these tile constants (BLOCK_W, BLOCK_T, BLOCK_K[, num_warps, num_stages]) and
    the FP8 weight instead of `decode_config`'s or the autotuned prefill ones."""
    t, hd = o.shape
    kg = hd // n_groups
    assert wo_a.shape == (n_groups * rank, kg), f"o_lora: wo_a {tuple(wo_a.shape)} for {n_groups} x {rank} x {kg}"
    assert o.dtype == torch.bfloat16 and wo_a.dtype == torch.bfloat16, (o.dtype, wo_a.dtype)
    o = o if o.stride(-1) == 1 else o.contiguous()
    fp8 = _fp8_weight(wo_a)
    small = t <= SMALL_M
    # decode streams the FP8 weight (half the bytes); prefill is MMA-bound and reads the bf16 wo_a the model holds:
    # the same bf16 values in the same chained accumulation, without dequantizing each weight tile in registers
    # again for every token tile (H200 sweep, G 8, 1024 tokens: 90 us against 115 us)
    use_fp8 = fp8 is not None and (small or _config is not None)
    w, s = (fp8[0], fp8[1]) if use_fp8 else (wo_a, wo_a)  # on wo_a's device
    bits = use_fp8 and fp8[2] and not runtime.interpreting()
    out = common.empty(t, n_groups, rank, dtype=torch.bfloat16, device=o.device)
    if t == 0:
        return out
    if _config is None and small:
        _config = decode_config(t, rank, n_groups, runtime.sm_count(o.device))
    kernel = _large if _config is None else _o_lora_kernel

    def grid(meta):
        return (runtime.cdiv(rank, meta["BLOCK_W"]), runtime.cdiv(t, meta["BLOCK_T"]), n_groups)

    with common.on_device(o):
        kernel[grid](
            o, w, s, out,
            t, rank, kg, common.bucket(t),
            o.stride(0), w.stride(0), s.stride(0), out.stride(0),
            W_FP8=use_fp8, BITS=bits, EVEN_K=kg % 256 == 0, DOT_F64=runtime.interpreting(), R_ALIGNED=rank % 128 == 0,
            **(_config or {}), **common.NO_FMA,
        )  # fmt: skip
    return out

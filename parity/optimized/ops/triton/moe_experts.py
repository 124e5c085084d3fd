"""Triton grouped MoE experts: routed SwiGLU experts over tokens sorted by expert, the shared expert in the same
launches, and the per-token fp32 combine in ascending expert id.

Reference: parity.reference.model.MoE.forward (with Expert.forward; spec §9.2, §9.3).

Steps (all on the device, no host sync):
1. Plan: the (token, slot) pairs sorted by expert id (stable, so tokens ascend inside an expert), cut into tiles
   of BLOCK_T rows that never straddle two experts; empty experts get no tile. The shared expert's tiles (all T
   tokens in order) follow the routed ones in the same plan. Up to PLAN_KERNEL_MAX_ROWS routed rows (decode) one
   program builds it (`_plan_kernel`); above, torch ops (`_plan_torch`, ~50 launches), the same values.
2. x quantized once per (token, 128-group) by the Triton act_quant (bit for bit the official recipe, spec §3.2:
   what `linear()` feeds the expert GEMM; quantizing in every program's K loop instead redid the same work once per
   feature slice, 16-32 times); with FP4 routed weights the same launch also stores a copy in the pairs order
   (`_gemm_common.pairs_order`), the order in which the FP4 tiles decode their weights without byte shuffles.
   Gate-up kernel, one program per (tile, 64/128-feature slice of the inter dim): the tile's quantized token rows
   are gathered, then g = x W1^T and u = x W3^T with the weight format's own block
   structure (FP4 e2m1: 32-wide K blocks, C += (P * sa) * sb, spec §3.5; FP8 e4m3 with 128x128 block scales: 128-wide
   K blocks, C += P * (sa * sb), spec §3.4), fp32 accumulated in ascending K, each rounded to bf16 as the GEMM's
   output. Epilogue (spec §9.2): u clamped to +-limit, g to max=limit (limit > 0 only), h = silu(g) * u in fp32
   (silu as g / (1 + exp(-g)) with an IEEE division, like torch's kernels), routed rows times their routing weight
   (fp32, route scale already in it, before w2), h rounded to bf16.
3. h quantized per 128-group by act_quant (the one in front of w2; with the pairs-order copy, read for the routed
   rows, when their weights are FP4), then the down kernel, one program per (tile,
   feature slice of dim): the same block GEMM with W2, the expert's bf16 output stored per sorted row.
   Both GEMM kernels accumulate K in chunks (`k_chunk`: at most 8 chunks of whole 128-K trips, a function of K
   alone; each chunk from zero, the chunk sums added in order, `_gemm_common`'s K-only chunking). The launches that
   `split_plan` picks (one token, long K) split K over the chunks, one program per (slice, tile, chunk): the
   last program of a tile to finish adds the chunk sums in order and runs the epilogue, in the same launch. Split or
   not, the same additions: the split changes no bit (tests: split against unsplit, and NaN-poisoned workspaces).
4. Combine kernel, per token: y = 0 (fp32); y += (its expert outputs, in ascending expert id); y += shared output;
   bf16. The same fp32 additions in the same order as the reference loop over experts (spec §9.3).

Weights: routed experts in FP4 (`float4_e2m1fn_x2` [I, D/2] + e8m0 [I, D/32]) or FP8 (the V4-Flash-Base layout:
e4m3 [I, D] + [I/128, D/128] block scales); the shared expert in FP8. The kernels read each expert's own
parameter tensors in place through a table of element offsets from the first expert's tensor (built once per set
of tensors and cached on their addresses), so nothing is stacked or copied.

Numerics vs the twin: only the block products differ (FP8 MMA on the GPU; the interpreter's float64 dot is the
twin's exact sum), as in fp4_gemm / fp8_gemm, plus the K chunks' grouping of the fp32 sum (where K has more than
8 trips) and exp() inside silu (Triton's exp vs torch's). Where a GEMM
output or h lands on the neighbouring bf16 value, the next act_quant may pick the neighbouring e4m3 value, so an
output can move by a fraction of the FP8 quantization error of its row; the tests propagate exactly that.
Duplicate expert ids in one token's row (the reference would keep only one of the two contributions) are summed
here. Unverified without a GPU: MMA bits, batch invariance across token-tile widths, the performance.
"""

import collections

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import act_quant, runtime

# ---- the block GEMM of one expert over one tile of quantized activations ----------------------------------------
# The hot loops call few nested jit helpers (one per 32-block product and per scale decode, shared with fp4_gemm /
# fp8_gemm in `_gemm_common`): the CPU interpreter pays milliseconds per call.


@triton.jit
def _mm_fp4(
    xq_ptr, xs_ptr, toks, mask_t, stride_xq, stride_xs, K_LO, K_HI, CHUNK,
    wa_ptr, wb_ptr, sa_ptr, sb_ptr, stride_w, stride_s, f0, NF,
    S_E8M0: tl.constexpr, POW2: tl.constexpr, DOT_F64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """xq[toks] (e4m3 [BLOCK_T rows, K], fp32 act_quant scales xs per 128-group) . W^T for one packed-FP4 weight
    [*, K/2] with per-32 scales, or two (w1 and w3: one [2 * BLOCK_W]-row tile): 32-wide K blocks, P from zero,
    C += (P * sa) * sb in ascending K (spec §3.5), over K in [K_LO, K_HI) accumulated in chunks of CHUNK (each
    chunk from zero, the chunk sums added in order: `_gemm_common`'s K-only chunking, which lets a split launch
    give the same bits). Returns fp32 [BLOCK_W or 2 * BLOCK_W, BLOCK_T].

    A loop trip is one activation 128-group, `_gemm_common.fp4_trip` (the decoding, the POW2 form and their
    compiled cost are in its docstring; fp4_gemm's loop runs the same trip). The activations come in the pairs
    order (`_gemm_common.pairs_order`: each 32-run's even elements, then its odd ones), and the weights are decoded
    to the same order: a run's 16 bytes give its low-nibble half and its high-nibble half, placed side by side with
    no byte shuffles (interleaving them back to K order took 148 PRMT per trip). The block product sums the same 32
    products; only their order inside the MMA differs (exact in the interpreter's float64 dot; on the GPU whether
    Hopper's internal FP8 sum depends on the lane order is not documented, and the GPU tests judge the op by its
    tolerance as before). The K chunks' flush is a branch at the end of a trip, taken once a chunk (compiled: 457
    instructions a trip with it, 437 without)."""
    offs32 = tl.arange(0, 32)
    r = tl.arange(0, ROWS)
    second = r >= BLOCK_W
    f = f0 + r % BLOCK_W  # the weight row (output feature) of each tile row
    mf = f < NF
    # a row's 32 weights of one K block: 16 contiguous bytes, element 2b in the low nibble of byte b (spec §2.2)
    w_ptrs = tl.where(second[:, None], wb_ptr, wa_ptr) + f[:, None] * stride_w + tl.arange(0, 16)[None, :]
    # a 128-group's four scales
    s_ptrs = (tl.where(second, sb_ptr, sa_ptr) + f * stride_s)[:, None] + tl.arange(0, 4)[None, :]
    xq_ptrs = xq_ptr + toks[None, :] * stride_xq + offs32[:, None]  # [32, BLOCK_T], K-major
    xs_ptrs = xs_ptr + toks * stride_xs  # each token's scale of one 128-group
    mask_x = mask_t[None, :]
    mask_w = mf[:, None]
    acc = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    total = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    # the scales are read one 128-K step ahead: a few bytes a row are too narrow for the pipeliner's async copies,
    # and a plain load in the step that uses it waits out a whole memory latency
    s4_next = tl.load(s_ptrs + K_LO // 32, mask=mask_w, other=127)
    sx_next = tl.load(xs_ptrs + K_LO // 128, mask=mask_t, other=1.0)
    for k0 in range(K_LO, K_HI, 128):
        s4 = s4_next
        s_act = sx_next[None, :]
        more = k0 + 128 < K_HI
        s4_next = tl.load(s_ptrs + (k0 + 128) // 32, mask=mask_w & more, other=127)
        sx_next = tl.load(xs_ptrs + (k0 + 128) // 128, mask=mask_t & more, other=1.0)
        acc = common.fp4_trip(
            acc, w_ptrs + k0 // 2, xq_ptrs + k0, mask_w, mask_x, s4, s_act, S_E8M0, 4, POW2, DOT_F64, False
        )
        if ((k0 + 128) % CHUNK == 0) | (k0 + 128 >= K_HI):  # a branch taken once a chunk (compiled: 2 of ~440)
            total += acc
            acc = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    return total


@triton.jit
def _mm_fp8(
    xq_ptr, xs_ptr, toks, mask_t, stride_xq, stride_xs, K_LO, K_HI, CHUNK,
    wa_ptr, wb_ptr, sa_ptr, sb_ptr, stride_w, stride_s, f0, NF,
    S_E8M0: tl.constexpr, POW2: tl.constexpr, DOT_F64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """The same for e4m3 weights [*, K] with 128x128 block scales [*, K/128]: 128-wide K blocks, P from zero,
    C += P * (sa * sb) in ascending K (spec §3.4), chunked as there; each weight row reads its own 128-row scale
    block. POW2 (both scales powers of two): P * (sa * sb) is exact, so C + P * (sa * sb) is one fma, the same bits."""
    offs128 = tl.arange(0, 128)
    r = tl.arange(0, ROWS)
    second = r >= BLOCK_W
    f = f0 + r % BLOCK_W  # the weight row (output feature) of each tile row
    mf = f < NF
    w_ptrs = tl.where(second[:, None], wb_ptr, wa_ptr) + f[:, None] * stride_w + offs128[None, :]
    s_ptrs = tl.where(second, sb_ptr, sa_ptr) + (f // 128) * stride_s  # each row's 128-row scale block
    xq_ptrs = xq_ptr + toks[None, :] * stride_xq + offs128[:, None]  # [128, BLOCK_T], K-major
    xs_ptrs = xs_ptr + toks * stride_xs
    acc = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    total = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    sw_next = tl.load(s_ptrs + K_LO // 128, mask=mf, other=127)  # read one step ahead (see _mm_fp4)
    sx_next = tl.load(xs_ptrs + K_LO // 128, mask=mask_t, other=1.0)
    for k0 in range(K_LO, K_HI, 128):
        sw = sw_next
        s_act = sx_next
        more = k0 + 128 < K_HI
        sw_next = tl.load(s_ptrs + (k0 + 128) // 128, mask=mf & more, other=127)
        sx_next = tl.load(xs_ptrs + (k0 + 128) // 128, mask=mask_t & more, other=1.0)
        xq = tl.load(xq_ptrs + k0, mask=mask_t[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=mf[:, None], other=0.0)
        if S_E8M0:
            sw = common.e8m0_to_f32(sw)
        if DOT_F64:
            p = tl.dot(w.to(tl.float64), xq.to(tl.float64), input_precision="ieee").to(tl.float32)
        else:
            p = tl.dot(w, xq)
        if POW2:
            acc = tl.fma(p, s_act[None, :] * sw[:, None], acc)
        else:
            acc += p * (s_act[None, :] * sw[:, None])  # the official Scale_C = sa * sb, then C += P * Scale_C
        if ((k0 + 128) % CHUNK == 0) | (k0 + 128 >= K_HI):
            total += acc
            acc = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    return total


# ---- kernels ------------------------------------------------------------------------------------------------------


@triton.jit
def _k_range(K, CHUNK, SPLIT: tl.constexpr):
    """The K range of this program: all of it, or with SPLIT its chunk (grid axis 2)."""
    if SPLIT:
        # a multiple of 128 (CHUNK is whole 128-K trips): said so, or the pipeliner cannot prove the K loop's loads
        # aligned and leaves them synchronous (compiled for sm_90: no async copies at all)
        k_lo = tl.multiple_of(tl.program_id(2) * CHUNK, 128)
        return k_lo, tl.minimum(k_lo + CHUNK, K)
    return 0, K


@triton.jit
def _chunk_sums(acc, ws_ptr, cnt_ptr, rows, cols, mask, WS_ROWS, WS_COLS):
    """A split launch's chunk sums of one tile (`_gemm_common.last_arrival_sum`) in the fp32 workspace
    [chunks, WS_ROWS, WS_COLS] at (rows, cols): the last program of the tile to arrive gets (True, 0 + ws[0] +
    ws[1] + ... in chunk order: the additions of the unsplit chunk loop), the others (False, acc)."""
    ws_ptrs = ws_ptr + rows[None, :].to(tl.int64) * WS_COLS + cols[:, None]
    return common.last_arrival_sum(acc, ws_ptrs, WS_ROWS.to(tl.int64) * WS_COLS, cnt_ptr, mask)


@triton.jit
def _expert_offset(col_ptr, e, ALIGNED: tl.constexpr):
    """Expert e's element offset from expert 0's tensor. ALIGNED (the host checked every offset of the table is a
    multiple of 16 elements) tells the compiler so: without it the weight rows read through the offset have unknown
    alignment, Triton loads them a byte at a time and its pipeliner leaves them synchronous (compiled for sm_90: the
    FP4 gate-up loop held 4 synchronous weight loads per 128-K step, a full memory latency each)."""
    off = tl.load(col_ptr + e)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return off


@triton.jit(do_not_specialize=["N_PLAN"])
def _gate_up_kernel(
    xq_ptr, xqp_ptr, xs_ptr, plan_ptr, row_tok_ptr, row_w_ptr, h_ptr,
    w1_ptr, w3_ptr, s1_ptr, s3_ptr, off_ptr,
    sw1_ptr, sw3_ptr, ss1_ptr, ss3_ptr,
    ws_ptr, cnt_ptr,
    N_PLAN, E, D, INTER, CHUNK, WS_ROWS,
    stride_xq, stride_xs, stride_h, stride_w, stride_s, stride_sw, stride_ss,
    LIMIT, SHARED_LIMIT,
    ROUTED_FP4: tl.constexpr, W_E8M0: tl.constexpr, SH_E8M0: tl.constexpr, ACT_POW2: tl.constexpr,
    DOT_F64: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_f = tl.program_id(0)
    tile = tl.program_id(1)
    e = tl.load(plan_ptr + tile)  # expert id; E = the shared expert
    row0 = tl.load(plan_ptr + N_PLAN + tile)  # first row of the tile in the sorted-row buffers
    n_rows = tl.load(plan_ptr + 2 * N_PLAN + tile)
    if n_rows > 0:
        offs_t = tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_rows
        rows = row0 + offs_t
        toks = tl.load(row_tok_ptr + rows, mask=mask_t, other=0)
        f0 = pid_f * BLOCK_W
        NF = INTER
        feats = f0 + tl.arange(0, BLOCK_W)
        mask_f = feats < INTER
        k_lo, k_hi = _k_range(D, CHUNK, SPLIT)
        if e == E:
            acc = _mm_fp8(
                xq_ptr, xs_ptr, toks, mask_t, stride_xq, stride_xs, k_lo, k_hi, CHUNK, sw1_ptr, sw3_ptr, ss1_ptr,
                ss3_ptr, stride_sw, stride_ss, f0, NF, SH_E8M0, SH_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T,
                2 * BLOCK_W,
            )  # fmt: skip
            limit = SHARED_LIMIT
        else:
            wa = w1_ptr + _expert_offset(off_ptr, e, ALIGNED)
            wb = w3_ptr + _expert_offset(off_ptr + E, e, ALIGNED)
            sa = s1_ptr + _expert_offset(off_ptr + 2 * E, e, ALIGNED)
            sb = s3_ptr + _expert_offset(off_ptr + 3 * E, e, ALIGNED)
            if ROUTED_FP4:
                acc = _mm_fp4(  # the activations in the pairs order (`_gemm_common.pairs_order`)
                    xqp_ptr, xs_ptr, toks, mask_t, stride_xq, stride_xs, k_lo, k_hi, CHUNK, wa, wb, sa, sb,
                    stride_w, stride_s,
                    f0, NF, W_E8M0, W_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T, 2 * BLOCK_W,
                )  # fmt: skip
            else:
                acc = _mm_fp8(
                    xq_ptr, xs_ptr, toks, mask_t, stride_xq, stride_xs, k_lo, k_hi, CHUNK, wa, wb, sa, sb,
                    stride_w, stride_s,
                    f0, NF, W_E8M0, W_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T, 2 * BLOCK_W,
                )  # fmt: skip
            limit = LIMIT
        done = True
        if SPLIT:  # w1 rows at workspace columns [0, INTER), w3 rows at [INTER, 2 * INTER)
            r = tl.arange(0, 2 * BLOCK_W)
            cols = (r >= BLOCK_W) * INTER + f0 + r % BLOCK_W
            mask = ((f0 + r % BLOCK_W) < INTER)[:, None] & mask_t[None, :]
            done, acc = _chunk_sums(acc, ws_ptr, cnt_ptr, rows, cols, mask, WS_ROWS, 2 * INTER)
        if done:
            # the GEMMs' bf16 outputs, widened (spec §9.2 step 1)
            g, u = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_W, BLOCK_T)), (1, 2, 0)))  # w1 rows, w3 rows
            g = g.to(tl.bfloat16).to(tl.float32)
            u = u.to(tl.bfloat16).to(tl.float32)
            if limit > 0:
                u = tl.clamp(u, -limit, limit)
                g = tl.minimum(g, limit)
            h = tl.div_rn(g, 1.0 + tl.exp(-g)) * u
            if e != E:
                h = tl.load(row_w_ptr + rows, mask=mask_t, other=0.0)[None, :] * h  # the routing weight, before w2
            h_ptrs = h_ptr + rows[None, :] * stride_h + feats[:, None]
            tl.store(h_ptrs, h.to(tl.bfloat16), mask=mask_f[:, None] & mask_t[None, :])


@triton.jit(do_not_specialize=["N_PLAN"])
def _down_kernel(
    hq_ptr, hqp_ptr, hs_ptr, plan_ptr, out_ptr,
    w2_ptr, s2_ptr, off_ptr, sw2_ptr, ss2_ptr, ws_ptr, cnt_ptr,
    N_PLAN, E, D, INTER, CHUNK, WS_ROWS,
    stride_hq, stride_hs, stride_out, stride_w, stride_s, stride_sw, stride_ss,
    ROUTED_FP4: tl.constexpr, W_E8M0: tl.constexpr, SH_E8M0: tl.constexpr, ACT_POW2: tl.constexpr,
    DOT_F64: tl.constexpr, ALIGNED: tl.constexpr, SPLIT: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_f = tl.program_id(0)
    tile = tl.program_id(1)
    e = tl.load(plan_ptr + tile)
    row0 = tl.load(plan_ptr + N_PLAN + tile)
    n_rows = tl.load(plan_ptr + 2 * N_PLAN + tile)
    if n_rows > 0:
        offs_t = tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_rows
        rows = row0 + offs_t
        f0 = pid_f * BLOCK_W
        NF = D
        feats = f0 + tl.arange(0, BLOCK_W)
        mask_f = feats < D
        k_lo, k_hi = _k_range(INTER, CHUNK, SPLIT)
        if e == E:
            y = _mm_fp8(
                hq_ptr, hs_ptr, rows, mask_t, stride_hq, stride_hs, k_lo, k_hi, CHUNK, sw2_ptr, sw2_ptr, ss2_ptr,
                ss2_ptr, stride_sw, stride_ss, f0, NF, SH_E8M0, SH_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T,
                BLOCK_W,
            )  # fmt: skip
        else:
            wa = w2_ptr + _expert_offset(off_ptr, e, ALIGNED)
            sa = s2_ptr + _expert_offset(off_ptr + E, e, ALIGNED)
            if ROUTED_FP4:
                y = _mm_fp4(  # the routed rows in the pairs order (`_gemm_common.pairs_order`)
                    hqp_ptr, hs_ptr, rows, mask_t, stride_hq, stride_hs, k_lo, k_hi, CHUNK, wa, wa, sa, sa,
                    stride_w, stride_s,
                    f0, NF, W_E8M0, W_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T, BLOCK_W,
                )  # fmt: skip
            else:
                y = _mm_fp8(
                    hq_ptr, hs_ptr, rows, mask_t, stride_hq, stride_hs, k_lo, k_hi, CHUNK, wa, wa, sa, sa,
                    stride_w, stride_s,
                    f0, NF, W_E8M0, W_E8M0 and ACT_POW2, DOT_F64, BLOCK_W, BLOCK_T, BLOCK_W,
                )  # fmt: skip
        mask = mask_f[:, None] & mask_t[None, :]
        done = True
        if SPLIT:
            done, y = _chunk_sums(y, ws_ptr, cnt_ptr, rows, feats, mask, WS_ROWS, D)
        if done:
            tl.store(out_ptr + rows[None, :] * stride_out + feats[:, None], y.to(tl.bfloat16), mask=mask)


@triton.jit(do_not_specialize=["T", "R"])
def _combine_kernel(
    y_ptr, pos_ptr, out_ptr, T, D, R, TOPK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    # out[t] = bf16(((0 + y[pos[t, 0]]) + y[pos[t, 1]] + ...) + y[R + t]): slots pre-sorted by ascending expert id
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        pos = tl.load(pos_ptr + offs_t * TOPK + j, mask=mask_t, other=0).to(tl.int64)
        acc += tl.load(y_ptr + pos[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    acc += tl.load(y_ptr + (R + offs_t.to(tl.int64))[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    tl.store(out_ptr + offs_t[:, None] * D + offs_d[None, :], acc.to(tl.bfloat16), mask=mask)


# ---- autotuning (GPU) ---------------------------------------------------------------------------------------------


def _configs(interpreter_width, gate_up: bool):
    if runtime.interpreting():
        return [triton.Config({"BLOCK_W": interpreter_width}, num_warps=4)]
    # feature slices of 64 (4 warps) or 128 (8 warps): wgmma. Compiled for sm_90 (bench --compile-check moe), only the
    # FP4 gate-up's 64 on 4 warps at 32-row tiles spills (8 B, session 32): kept, as the autotuner times it
    configs = [
        triton.Config({"BLOCK_W": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_W": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_W": 64}, num_warps=4, num_stages=5),
    ]
    if gate_up:
        # 32 features (64 tile rows with w3's: still one wgmma M): twice the programs of 64, for decode batches, whose
        # 7-13 experts x 64-feature slices fill the H200's 132 SMs ~1.7 times. Not for down: its 32-row tile compiles
        # to mma.sync, whose FP8 accumulation need not match wgmma's
        configs.append(triton.Config({"BLOCK_W": 32}, num_warps=4, num_stages=4))
    else:
        # 128 features on 4 warps (one warp group holds the [128, 16] accumulator): half the programs of 64, each
        # streaming twice the rows. H100, whole op, graph us with the down forced to it / to 64 on 4 warps (session
        # 31, `perf-h200/session31.md`, the split rule of then): Flash 1 token 109.4 / 109.5, 8 tokens 574.7 / 583.4,
        # 64 tokens 1657.5 / 1710.7; Pro 1 token 205.8 / 207.0, 8 tokens 1215.2 / 1264.4. It spills (8 B) at 32-row
        # tiles in the sm_90 compile, so `_down_prune` offers it to 16-row tiles (decode sizes) only
        configs.append(triton.Config({"BLOCK_W": 128}, num_warps=4, num_stages=4))
    return configs


def _down_prune(configs, named_args, **kwargs):
    """The down configs a launch may try: the 4-warp 128-feature one only with 16-row token tiles (`_configs`)."""
    return [c for c in configs if kwargs["BLOCK_T"] == 16 or (c.kwargs["BLOCK_W"], c.num_warps) != (128, 4)]


_KEY = ["D", "INTER", "E", "ROUTED_FP4", "BLOCK_T", "SPLIT"]  # not T: one tuning per token-tile size class
# interpreter: gate-up tiles hold w1 and w3 (2 x 128 rows), down tiles 256 rows: the tiny model in one slice each
_gate_up = common.autotune(_configs(128, gate_up=True), _KEY)(_gate_up_kernel)
_down = common.autotune(_configs(256, gate_up=False), _KEY, prune=_down_prune)(_down_kernel)


# ---- host side ------------------------------------------------------------------------------------------------


def _u8(t: torch.Tensor) -> torch.Tensor:
    """e8m0 / fp4 tensors as their bytes (Triton has no such types); others unchanged."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e8m0fnu, torch.float4_e2m1fn_x2) else t


_TABLES: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()


def _offset_table(experts, names) -> tuple[torch.Tensor, bool]:
    """int64 [len(names), E] element offsets of each expert's tensors from expert 0's, on their device, and whether
    every offset is a multiple of 16 elements. Cached on the tensors' addresses (the table is a pure function of them,
    so a reused address can never make it stale)."""
    # the key from the parameters' own addresses: a byte view has the same address, and making 6 x E views per call
    # cost milliseconds of Python (measured on the H200 host: 7 ms of a one-token call)
    key = tuple(getattr(e, n)[i].data_ptr() for n, i in names for e in experts) + (str(experts[0].w1[0].device),)
    entry = _TABLES.get(key)
    if entry is None:
        tensors = [[_u8(getattr(e, n)[i]) for e in experts] for n, i in names]
        rows = []
        for col in tensors:
            base, size = col[0].data_ptr(), col[0].element_size()
            assert all(t.shape == col[0].shape and t.dtype == col[0].dtype and t.is_contiguous() for t in col)
            assert all((t.data_ptr() - base) % size == 0 for t in col)
            rows.append([(t.data_ptr() - base) // size for t in col])
        table = torch.tensor(rows, dtype=torch.int64, device=tensors[0][0].device)
        entry = (table, all(off % 16 == 0 for row in rows for off in row))
        _TABLES[key] = entry
        if len(_TABLES) > 256:
            _TABLES.popitem(last=False)
    return entry


def _block_t(rows_per_expert: float) -> int:
    if runtime.interpreting():
        return 128  # few programs: the interpreter pays per program instance
    # 64-token gate-up tiles (w1 and w3 rows: a [2 x BLOCK_W, 64] accumulator) spill on sm_90 (bench --compile-check)
    return 16 if rows_per_expert <= 16 else 32


# routed rows (tokens x top-k) up to which one program builds the plan (`_plan_kernel`): decode batches and short
# chunks; above it the torch ops (one program would hold [rows] sort networks too large for its registers)
PLAN_KERNEL_MAX_ROWS = 1024
PLAN_KERNEL_MAX_EXPERTS = 1024


def _plan(indices: torch.Tensor, weights: torch.Tensor, n_experts: int, t: int, bt: int):
    """Sorted rows and the tile plan, all device tensors (no host sync). Rows [0, R) are the routed (token, slot)
    pairs sorted by expert id (tokens ascending within an expert), rows [R, R + T) the shared expert's tokens.
    Returns (plan int32 [3, n_plan]: expert, first row, row count; row -> token; row -> routing weight; position of
    each token's slots in ascending expert order [T, k]). Up to PLAN_KERNEL_MAX_ROWS routed rows one launch builds
    it (`_plan_kernel`, the same values as `_plan_torch`, its twin): the torch form is ~50 launches, about a third of
    a decode layer's, and a decode step is bound by the host's launches."""
    r = t * indices.shape[1]
    if 0 < r <= PLAN_KERNEL_MAX_ROWS and n_experts <= PLAN_KERNEL_MAX_EXPERTS:
        return _plan_one_launch(indices, weights, n_experts, t, bt)
    return _plan_torch(indices, weights, n_experts, t, bt)


def _n_plan(r: int, t: int, n_experts: int, bt: int) -> tuple[int, int]:
    """(routed plan entries, shared plan entries): the routed count is an upper bound of the tiles the experts need
    (each expert's last tile may be partial), known without reading the counts back."""
    return runtime.cdiv(r, bt) + min(n_experts, r), runtime.cdiv(t, bt)


@triton.jit
def _plan_kernel(
    idx_ptr, w_ptr, plan_ptr, row_tok_ptr, row_w_ptr, pos_ptr, inv_ptr, sorted_e_ptr, first_ptr, last_ptr,
    T, R, E, N_ROUTED, N_PLAN,
    K: tl.constexpr, KP: tl.constexpr, TP: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, LP: tl.constexpr,
    NP: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    # one program: a stable sort of the routed rows by expert, then every output from the sorted order
    q = tl.arange(0, RP)
    valid = q < R
    e = tl.load(idx_ptr + q, mask=valid, other=0).to(tl.int32)
    key = tl.where(valid, e, E) * RP + q  # expert-major, row index minor: the sort is stable; padding sorts last
    skey = tl.sort(key)
    order = skey % RP  # sorted position -> row (token * K + slot)
    es = skey // RP
    tl.store(row_tok_ptr + q, order // K, mask=valid)
    tl.store(row_w_ptr + q, tl.load(w_ptr + order, mask=valid, other=0.0).to(tl.float32), mask=valid)
    tl.store(inv_ptr + order, q, mask=valid)  # row -> sorted position
    tl.store(sorted_e_ptr + q, es, mask=valid)
    ex = tl.arange(0, EP)
    tl.store(first_ptr + ex, 0, mask=ex < E)
    tl.store(last_ptr + ex, -1, mask=ex < E)  # an empty expert: count = last - first + 1 = 0
    tl.debug_barrier()  # the stores above are read back by other threads of this program below
    prev = tl.load(sorted_e_ptr + q - 1, mask=valid & (q > 0), other=-1)
    nxt = tl.load(sorted_e_ptr + q + 1, mask=q + 1 < R, other=-1)
    tl.store(first_ptr + es, q, mask=valid & (es != prev))
    tl.store(last_ptr + es, q, mask=valid & (es != nxt))
    tl.debug_barrier()
    emask = ex < E
    counts = tl.load(last_ptr + ex, mask=emask, other=-1) - tl.load(first_ptr + ex, mask=emask, other=0) + 1
    starts = tl.cumsum(counts, 0) - counts
    tiles = (counts + BT - 1) // BT
    tile_start = tl.cumsum(tiles, 0) - tiles
    # each expert's tiles at plan entries tile_start[e] + l, l < tiles[e] (a loop over l: an [experts, tiles] block
    # spilled at 1024 experts)
    for lt in range(0, LP):
        own = emask & (lt < tiles)
        at = tile_start + lt
        tl.store(plan_ptr + at, ex, mask=own)
        tl.store(plan_ptr + N_PLAN + at, starts + lt * BT, mask=own)
        tl.store(plan_ptr + 2 * N_PLAN + at, tl.minimum(counts - lt * BT, BT), mask=own)
    # entries past the routed tiles (the bound is loose): expert E, no rows, the first row the torch form computes
    # (the last expert's start + its local tile offset); then the shared expert's tiles
    last_e = ex == E - 1
    start_last = tl.sum(tl.where(last_e, starts, 0), axis=0)
    tile_start_last = tl.sum(tl.where(last_e, tile_start, 0), axis=0)
    total = tl.sum(tiles, axis=0)
    i = tl.arange(0, NP)
    pad = (i >= total) & (i < N_ROUTED)
    sh = i - N_ROUTED
    shared = (i >= N_ROUTED) & (i < N_PLAN)
    tl.store(plan_ptr + i, tl.where(pad | shared, E, 0), mask=pad | shared)
    tl.store(plan_ptr + N_PLAN + i, tl.where(pad, start_last + (i - tile_start_last) * BT, R + sh * BT),
             mask=pad | shared)  # fmt: skip
    tl.store(plan_ptr + 2 * N_PLAN + i, tl.where(pad, 0, tl.minimum(T - sh * BT, BT)), mask=pad | shared)
    tok = tl.arange(0, TP)
    tl.store(row_tok_ptr + R + tok, tok, mask=tok < T)
    tl.store(row_w_ptr + R + tok, tl.full([TP], 1.0, tl.float32), mask=tok < T)
    # a token's slots in ascending (expert, slot) order = its rows' sorted positions, ascending
    slot = tl.arange(0, KP)
    tmask = (tok < T)[:, None] & (slot < K)[None, :]
    ranks = tl.load(inv_ptr + tok[:, None] * K + slot[None, :], mask=tmask, other=2147483647)
    tl.store(pos_ptr + tok[:, None] * K + slot[None, :], tl.sort(ranks, dim=1), mask=tmask)


def _plan_one_launch(indices, weights, n_experts, t, bt):
    dev = indices.device
    k = indices.shape[1]
    r = t * k
    n_routed, n_shared = _n_plan(r, t, n_experts, bt)
    n_plan = n_routed + n_shared
    plan = torch.empty(3, n_plan, dtype=torch.int32, device=dev)
    row_tok = torch.empty(r + t, dtype=torch.int32, device=dev)
    row_w = torch.empty(r + t, dtype=torch.float32, device=dev)
    pos = torch.empty(t, k, dtype=torch.int32, device=dev)
    scratch = torch.empty(2 * r + 2 * n_experts, dtype=torch.int32, device=dev)
    inv, sorted_e, first, last = scratch.split([r, r, n_experts, n_experts])
    with common.on_device(indices):
        _plan_kernel[(1,)](
            indices.contiguous(), weights.contiguous(), plan, row_tok, row_w, pos, inv, sorted_e, first, last,
            t, r, n_experts, n_routed, n_plan, **plan_constants(t, k, n_experts, bt), num_warps=4,
        )  # fmt: skip
    return plan, row_tok, row_w, pos


def plan_constants(t: int, k: int, n_experts: int, bt: int) -> dict:
    """`_plan_kernel`'s compile-time sizes for t tokens of top-k over n_experts, tiles of bt rows (also what the sm_90
    compile check builds). Sorted axes are padded to at least 2: a sort network of one element is none."""
    p2 = runtime.next_pow2
    r = t * k
    n_plan = sum(_n_plan(r, t, n_experts, bt))
    return dict(K=k, KP=max(2, p2(k)), TP=p2(t), RP=max(2, p2(r)), EP=p2(n_experts), LP=p2(runtime.cdiv(r, bt)),
                NP=p2(n_plan), BT=bt)  # fmt: skip


def _plan_torch(indices: torch.Tensor, weights: torch.Tensor, n_experts: int, t: int, bt: int):
    """`_plan` in torch ops (any size)."""
    dev = indices.device
    k = indices.shape[1]
    r = t * k
    flat = indices.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: CUDA's bincount reads the largest id back to the host, a sync that also keeps the
    # op out of CUDA graphs
    counts = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    starts = torch.cumsum(counts, 0) - counts
    tiles = (counts + bt - 1) // bt
    tile_end = torch.cumsum(tiles, 0)
    n_routed, n_shared = _n_plan(r, t, n_experts, bt)
    i = torch.arange(n_routed, device=dev)
    e = torch.searchsorted(tile_end, i, right=True)
    ec = e.clamp(max=n_experts - 1)
    local = i - (tile_end - tiles)[ec]
    n_rows = torch.where(e < n_experts, (counts[ec] - local * bt).clamp(0, bt), 0)
    row0 = starts[ec] + local * bt
    i_sh = torch.arange(n_shared, device=dev)
    plan = torch.stack(
        [
            torch.cat([e, torch.full_like(i_sh, n_experts)]),
            torch.cat([row0, r + i_sh * bt]),
            torch.cat([n_rows, (t - i_sh * bt).clamp(max=bt)]),
        ]
    ).to(torch.int32)
    row_tok = torch.cat([order // k, torch.arange(t, device=dev)]).to(torch.int32)
    row_w = torch.cat([weights.reshape(-1).float()[order], torch.ones(t, device=dev)])
    inv = torch.empty_like(order)
    inv[order] = torch.arange(r, device=dev)
    pos = inv.view(t, k).gather(1, torch.argsort(indices.long(), dim=1, stable=True)).to(torch.int32)
    return plan.contiguous(), row_tok, row_w, pos


def _quantize(v: torch.Tensor, scale_fmt, pairs: bool):
    """act_quant per 128-group (e4m3 values, fp32 scales) and the values the routed tiles read: with FP4 routed weights
    a copy in the pairs order (`_gemm_common.pairs_order`), stored by the same launch (a copy kernel of its own cost
    one more small launch per call), else the natural values again (the FP8 tiles, and the shared expert's always)."""
    if pairs:
        return act_quant.quantize(v, 128, scale_fmt, torch.float32, pairs=True)
    q, s = act_quant.quantize(v, 128, scale_fmt, torch.float32)
    return q, s, q


# Split K (one program per (slice, tile, chunk); the last of a tile's programs adds the chunk sums in order) only
# where it paid: one-token launches (routed + shared rows at top-6: SPLIT_MAX_ROWS) of a model whose gate-up K has
# more than SPLIT_MIN_TRIPS 128-K trips (V4-Pro's 7168: 56). The chunking is the same whether or not a launch splits
# (a function of K), so the split changes no bit. H100, graph us a call, both launches split / neither (session 31,
# `perf-h200/session31.md`; until then both split up to 64 rows): Pro 1 token 201.5 / 218.0, 8 tokens 1199.4 /
# 1076.2; Flash 1 token 107.5 / 100.4, 8 tokens 516.4 / 411.9. The split's 8x programs of a few loop trips each,
# with their partial sums and arrivals, cost more than the idle SMs they fill, except where each unsplit program
# streams 56 trips (Pro's gate-up); 2 to 7 tokens were not timed and do not split (8 tokens lost for both models).
SPLIT_MAX_ROWS = 7
SPLIT_MIN_TRIPS = 32


def split_plan(rows: int, d: int) -> bool:
    """Whether the gate-up and down launches of `rows` sorted rows (routed + shared) split K on the GPU, for a model
    of dim `d` (the gate-up's K)."""
    return rows <= SPLIT_MAX_ROWS and d // 128 > SPLIT_MIN_TRIPS


def k_chunk(k: int) -> tuple[int, int]:
    """(chunk length, chunks) of a K: `_gemm_common`'s K-only chunking of its 128-K trips (at most MAX_CHUNKS)."""
    trips = k // 128
    return common.chunk_blocks(trips) * 128, common.n_chunks(trips)


def moe_experts(
    x, weights, indices, experts, shared, scale_fmt, scale_dtype, *, _pow2: bool = True, _split: bool | None = None
) -> torch.Tensor:
    """Routed SwiGLU experts (ascending-id fp32 accumulation) plus the shared expert: bf16 `[T, D]` -> same.

    Args:
        x (torch.Tensor): bf16 `[T, D]`; weights fp32 `[T, k]` (route scale included); indices `[T, k]` expert ids.
        experts (list): `ExpertWeights` per routed expert, all FP4 or all FP8; shared: the FP8 shared expert.
        scale_fmt, scale_dtype: the act_quant policy of the expert inputs ("ue8m0": power-of-two scales).
        _pow2 (bool): tests only: False scales the FP4 block products in the twin's form even where every scale is
            a power of two (`_mm_fp4`'s POW2).
        _split (bool, Optional): tests only: force (True) or forbid (False) the split-K launches.
    """
    t, d = x.shape
    n_exp = len(experts)
    k = indices.shape[1]
    dev = x.device
    out = common.empty(t, d, dtype=torch.bfloat16, device=dev)
    if t == 0:
        return out
    w1 = experts[0].w1[0]
    routed_fp4 = w1.dtype == torch.float4_e2m1fn_x2
    assert routed_fp4 or w1.dtype == torch.float8_e4m3fn, f"moe_experts: routed weights of dtype {w1.dtype}"
    assert shared.w1[0].dtype == torch.float8_e4m3fn, f"moe_experts: shared expert of dtype {shared.w1[0].dtype}"
    limits = {e.swiglu_limit for e in experts}
    assert len(limits) == 1, f"moe_experts: routed experts with different swiglu limits {limits}"
    inter = w1.shape[0]
    assert d % 128 == 0 and inter % 128 == 0, (d, inter)
    x = x.contiguous()
    r = t * k
    bt = _block_t(r / max(1, min(n_exp, r)))
    plan, row_tok, row_w, pos = _plan(indices, weights, n_exp, t, bt)
    n_plan = plan.shape[1]
    table1, aligned1 = _offset_table(experts, (("w1", 0), ("w3", 0), ("w1", 1), ("w3", 1)))
    table2, aligned2 = _offset_table(experts, (("w2", 0), ("w2", 1)))
    rw1, rs1, rw3, rs3 = (_u8(experts[0].w1[0]), _u8(experts[0].w1[1]), _u8(experts[0].w3[0]), _u8(experts[0].w3[1]))
    rw2, rs2 = _u8(experts[0].w2[0]), _u8(experts[0].w2[1])
    sw1, ss1, sw3, ss3 = (_u8(shared.w1[0]), _u8(shared.w1[1]), _u8(shared.w3[0]), _u8(shared.w3[1]))
    sw2, ss2 = _u8(shared.w2[0]), _u8(shared.w2[1])
    flags = dict(
        ROUTED_FP4=routed_fp4,
        W_E8M0=experts[0].w1[1].dtype == torch.float8_e8m0fnu,
        SH_E8M0=shared.w1[1].dtype == torch.float8_e8m0fnu,
        ACT_POW2=_pow2 and scale_fmt == "ue8m0",  # act_quant's scales are powers of two (spec §3.2)
        DOT_F64=runtime.interpreting(),
        BLOCK_T=bt,
    )
    # both tables under one flag: one compiled variant per kernel in practice (parameters are allocator-aligned)
    flags["ALIGNED"] = aligned1 and aligned2
    split = (split_plan(r + t, d) and not runtime.interpreting()) if _split is None else _split
    flags["SPLIT"] = split
    chunk1, chunks1 = k_chunk(d)
    chunk2, chunks2 = k_chunk(inter)
    h = common.empty(r + t, inter, dtype=torch.bfloat16, device=dev)
    y = common.empty(r + t, d, dtype=torch.bfloat16, device=dev)
    if split:  # the chunk sums of both launches, and arrival counters for the smallest tiles of any configuration
        ws1 = common.empty(chunks1, r + t, 2 * inter, dtype=torch.float32, device=dev)
        ws2 = common.empty(chunks2, r + t, d, dtype=torch.float32, device=dev)
        cnt = common.tile_counters(dev, n_plan * max(runtime.cdiv(inter, 32), runtime.cdiv(d, 32)))
    else:
        ws1 = ws2 = cnt = h  # unused
    with common.on_device(x), common.split_reduction(ws1, out, split, True):
        # each token's activations quantized once (what `linear()` feeds the expert GEMMs, bit for bit), not once per
        # feature slice in every program's K loop
        xq, xs, xqp = _quantize(x, scale_fmt, routed_fp4)
        _gate_up[lambda meta: (runtime.cdiv(inter, meta["BLOCK_W"]), n_plan, chunks1 if split else 1)](
            xq, xqp, xs, plan, row_tok, row_w, h,
            rw1, rw3, rs1, rs3, table1,
            sw1, sw3, ss1, ss3, ws1, cnt,
            n_plan, n_exp, d, inter, chunk1, r + t,
            xq.stride(0), xs.stride(0), h.stride(0), rw1.stride(0), rs1.stride(0), sw1.stride(0), ss1.stride(0),
            float(experts[0].swiglu_limit), float(shared.swiglu_limit),
            **flags,
            **common.NO_FMA,
        )  # fmt: skip
        hq, hs, hqp = _quantize(h, scale_fmt, routed_fp4)  # act_quant in front of w2, once (hqp: the routed rows read)
        _down[lambda meta: (runtime.cdiv(d, meta["BLOCK_W"]), n_plan, chunks2 if split else 1)](
            hq, hqp, hs, plan, y,
            rw2, rs2, table2, sw2, ss2, ws2, cnt,
            n_plan, n_exp, d, inter, chunk2, r + t,
            hq.stride(0), hs.stride(0), y.stride(0), rw2.stride(0), rs2.stride(0), sw2.stride(0), ss2.stride(0),
            **flags,
            **common.NO_FMA,
        )  # fmt: skip
        bt_c, bd_c = (256, 256) if runtime.interpreting() else (16, 256)
        _combine_kernel[(runtime.cdiv(t, bt_c), runtime.cdiv(d, bd_c))](
            y, pos, out, t, d, r, TOPK=k, BLOCK_T=bt_c, BLOCK_D=bd_c
        )
    return out

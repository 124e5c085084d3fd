"""Triton FP8 x FP8 block-scaled GEMM: C[M, N] = A[M, K] . B[N, K]^T, e4m3 operands, bf16 out.

Reference: parity.reference.kernels.fp8_gemm (the official TileLang `fp8_gemm`, spec §3.4).

Block structure (spec §3.4): for every 128-wide K block k, in ascending k, P_k = A_k . B_k^T on FP8 tensor cores
(`tl.dot` on float8e4nv operands, fp32 accumulation starting from zero for the block), the scale sa[m, k] * sb[n/128,
k] formed first, and C_acc += P_k * (sa * sb) in fp32; bf16 (round to nearest even) at the end. With K > 8 blocks
the fp32 sum is grouped in K-only chunks (`_gemm_common` docstring), which keeps split-K batch-invariant.

Layout: weight rows are the MMA's M side (BLOCK_W 64/128, inside one 128-row scale block, so sb is one scalar per
tile and K block), tokens its N side (BLOCK_T 16..128); small-M launches split K over chunks when the tile grid
would leave most SMs idle, and the last program to finish an output tile adds the tile's chunk sums in order, in
the same launch (`_gemm_common.store_tile`). Prefill launches order the grid token tiles first, so the CTAs
resident together share a weight tile in L2, and load both operands through TMA tensor descriptors (the copy engine;
the same values into the same dot, so the same bits).

`fp8_linear(x, b, b_s, ...)` is the same kernel with act_quant fused in front: bf16 activations are quantized per
(token, 128-group) in registers with the exact act_quant recipe (spec §3.2), so it equals act_quant + fp8_gemm bit
for bit while saving the quantized activation's round trip and one launch. The model calls act_quant and fp8_gemm
separately (the op contract), so only the benchmark uses it today.

Numerics vs the twin: the twin computes each P_k exactly (float64) and rounds it once to fp32; Hopper's FP8 MMA
keeps fewer accumulator bits in an undocumented order, so on the GPU P_k can differ in its last fp32 bits and an
output can land on the neighbouring bf16 value: within the twin's distance to the float64 block math plus 2^-12 of
the block terms' absolute sum plus one bf16 ulp. The CPU interpreter runs each block product as a float64 dot of
the exact products rounded once to fp32 (the twin's own P_k; also BLAS-fast, and independent of a token's position
in its tile, which numpy's fp32 GEMM is not), so there the kernel differs from the twin only by the chunk grouping.
On the GPU the op tests check batch invariance across the autotuned tile widths and the split; performance
against the issue's targets: docs/perf-h200/triton_gemm.md. Compiled for sm_90 on CPU (wgmma, registers, spills):
`python bench/triton_gemm.py --compile-check`.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import runtime

# the FP8 scale block along K (activations and weights); a constexpr: a plain global int is invisible to kernels
BLOCK_K = tl.constexpr(128)


@triton.jit
def _scales(as_ptrs, bs_ptrs, kb, kb_end, mask_t, FUSE_QUANT: tl.constexpr):
    """The raw scales of K block kb (nothing past kb_end): the activation's per token (when act_quant is fused it
    makes its own: the weight's scale stands in, unused) and the weight tile's one."""
    sb = tl.load(bs_ptrs + kb, mask=kb < kb_end)
    if FUSE_QUANT:
        sa = sb
    else:
        sa = tl.load(as_ptrs + kb, mask=mask_t & (kb < kb_end))
    return sa, sb


@triton.jit
def _add_block(
    acc, w_ptrs, a_ptrs, w_desc, a_desc, sa, sb, kb, mask_w, mask_t, pid_w, pid_t,
    A_E8M0: tl.constexpr, B_E8M0: tl.constexpr, FUSE_QUANT: tl.constexpr, DOT_F64: tl.constexpr,
    TMA: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """acc + P_k * (sa * sb) of K block kb (pointers at block 0; sa, sb its raw scales from `_scales`):
    [BLOCK_W, BLOCK_T] fp32, P_k from zero. Where both scales are powers of two (e8m0 weight scales, and e8m0 or
    fused act_quant activation scales) P_k * (sa * sb) is exact, so the sum is one fma with the same bits while
    nothing leaves fp32's normal range (tests: e8m0 against fp32 scales of the same values, bit for bit). Compiled
    for sm_90, the 128 x 64 prefill block 412 -> 348 instructions, the 64 x 64 decode block 315 -> 283.
    TMA: the operands come through tensor descriptors (the copy engine; rows past N or M read as zero, as the masked
    loads' `other`), the same values into the same dot."""
    if TMA:
        w = w_desc.load([pid_w * BLOCK_W, kb * BLOCK_K])
    else:
        w = tl.load(w_ptrs + kb * BLOCK_K, mask=mask_w[:, None], other=0.0)
    if FUSE_QUANT:
        a, sa = common.quant_e4m3(tl.load(a_ptrs + kb * BLOCK_K, mask=mask_t[None, :], other=0.0).to(tl.float32), 0)
    else:
        if TMA:
            a = tl.trans(a_desc.load([pid_t * BLOCK_T, kb * BLOCK_K]))  # [BLOCK_T, 128] -> K-major
        else:
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=mask_t[None, :], other=0.0)
        if A_E8M0:
            sa = common.e8m0_to_f32(sa)
    if B_E8M0:
        sb = common.e8m0_to_f32(sb)
    if DOT_F64:  # interpreter: an exact block product (see the module docstring), and BLAS-fast
        p = tl.dot(w.to(tl.float64), a.to(tl.float64), input_precision="ieee").to(tl.float32)
    else:
        p = tl.dot(w, a)
    if (A_E8M0 or FUSE_QUANT) and B_E8M0:
        return tl.fma(p, (sa * sb)[None, :], acc)
    return acc + p * (sa * sb)[None, :]  # the official Scale_C = sa * sb, formed before it meets P


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one compile for every token count
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, cnt_ptr,
    M, N, K, N_KB, CHUNK_KB, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    A_E8M0: tl.constexpr, B_E8M0: tl.constexpr, FUSE_QUANT: tl.constexpr,
    CHUNKED: tl.constexpr, SPLIT: tl.constexpr, IN_LAUNCH: tl.constexpr, DOT_F64: tl.constexpr, T_FAST: tl.constexpr,
    TMA: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # M_BUCKET only keys the autotuner (size class of M)
    if T_FAST:  # token tiles vary fastest along the launch: CTAs resident together share their weight tile in L2
        pid_t = tl.program_id(0)
        pid_w = tl.program_id(1)
    else:
        pid_w = tl.program_id(0)
        pid_t = tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # output features n (weight rows)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # tokens m
    offs_k = tl.arange(0, BLOCK_K)
    mask_w = offs_w < N
    mask_t = offs_t < M
    if SPLIT:
        kb_begin = tl.program_id(2) * CHUNK_KB
        kb_end = tl.minimum(kb_begin + CHUNK_KB, N_KB)
    else:
        kb_begin = 0
        kb_end = N_KB
    # K % 128 == 0 (asserted by the wrapper): only rows and tokens need masks, and they do not change along K
    w_ptrs = b_ptr + offs_w[:, None] * stride_bn + offs_k[None, :]  # [BLOCK_W, 128]
    a_ptrs = a_ptr + offs_t[None, :] * stride_am + offs_k[:, None]  # [128, BLOCK_T], K-major
    as_ptrs = as_ptr + offs_t * stride_asm
    # BLOCK_W divides 128, so the whole tile lies in one 128-row weight scale block
    bs_ptrs = bs_ptr + (pid_w * BLOCK_W // 128) * stride_bsn
    w_desc, a_desc = b_ptr, a_ptr  # unused without TMA
    if TMA:
        w_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_W, BLOCK_K])
        if not FUSE_QUANT:
            a_desc = tl.make_tensor_descriptor(
                a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_T, BLOCK_K]
            )
    total = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    # each block's scales are read one block ahead: a byte per token and one per tile are too narrow for the
    # pipeliner's async copies, and a plain load in the iteration that uses it waits out a whole memory latency
    sa_next, sb_next = _scales(as_ptrs, bs_ptrs, kb_begin, kb_end, mask_t, FUSE_QUANT)
    if CHUNKED:
        # chunks as the outer loop, a branch-free inner loop over the chunk's blocks (the same additions as
        # flushing the chunk sum inside one loop, measured 1.6-1.8x faster at 4096 tokens on the H200)
        for c0 in range(kb_begin, kb_end, CHUNK_KB):
            part = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
            for kb in range(c0, tl.minimum(c0 + CHUNK_KB, kb_end)):
                sa, sb = sa_next, sb_next
                sa_next, sb_next = _scales(as_ptrs, bs_ptrs, kb + 1, kb_end, mask_t, FUSE_QUANT)
                part = _add_block(part, w_ptrs, a_ptrs, w_desc, a_desc, sa, sb, kb, mask_w, mask_t, pid_w, pid_t,
                                  A_E8M0, B_E8M0, FUSE_QUANT, DOT_F64, TMA, BLOCK_W, BLOCK_T)  # fmt: skip
            total += part
    else:  # one block per chunk: the twin's own order, one accumulator fewer
        for kb in range(kb_begin, kb_end):
            sa, sb = sa_next, sb_next
            sa_next, sb_next = _scales(as_ptrs, bs_ptrs, kb + 1, kb_end, mask_t, FUSE_QUANT)
            total = _add_block(total, w_ptrs, a_ptrs, w_desc, a_desc, sa, sb, kb, mask_w, mask_t, pid_w, pid_t,
                               A_E8M0, B_E8M0, FUSE_QUANT, DOT_F64, TMA, BLOCK_W, BLOCK_T)  # fmt: skip
    mask = mask_w[:, None] & mask_t[None, :]
    common.store_tile(total, c_ptr, ws_ptr, cnt_ptr, offs_w, offs_t, mask, M, N, stride_cm, SPLIT, IN_LAUNCH)


def _configs(small_m: bool):
    if runtime.interpreting():
        # few, large programs: the interpreter pays per program instance
        return [triton.Config({"BLOCK_W": 128, "BLOCK_T": 256}, num_warps=4)]
    # (BLOCK_W, BLOCK_T, warps, stages), all wgmma for sm_90 (`python bench/triton_gemm.py --compile-check`), chosen
    # by the tile sweep on the H200 (bench/triton_gemm_sweep.py: CUDA-graph timing, weights streamed from HBM).
    # Decode: 64-row weight slices, one token tile up to 64 tokens (16-token tiles re-read the weights per tile).
    # Prefill: one warpgroup on 128 x 64 (1.6-2.8x the 8-warp 128 x 128 tiles: the per-block scaling holds three
    # fp32 accumulators, which 128 x 128 x 8 warps or larger tiles cannot keep in registers)
    if small_m:
        shapes = [(64, 16, 4, 4), (64, 64, 4, 4), (128, 64, 4, 4), (64, 16, 4, 6), (64, 32, 4, 6)]
    else:
        shapes = [(128, 64, 4, 4), (128, 64, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3)]
    return [triton.Config({"BLOCK_W": w, "BLOCK_T": t}, num_warps=nw, num_stages=st) for w, t, nw, st in shapes]


_KEY = ["N", "K", "M_BUCKET", "A_E8M0", "B_E8M0", "FUSE_QUANT", "SPLIT", "IN_LAUNCH"]
_small = common.autotune(_configs(True), _KEY)(_fp8_gemm_kernel)
_large = common.autotune(_configs(False), _KEY)(_fp8_gemm_kernel)
_SMALLEST = common.smallest_tile(_small, _large)  # a split launch's arrival counters (`split_buffers`)

SMALL_M = 64  # decode-sized launches: K split over chunks when the tiles leave SMs idle


def _launch(a, a_s, b, b_s, fuse_quant: bool, split: bool | None):
    """a: [M, K] e4m3 (or bf16 with fuse_quant, a_s None) -> bf16 [M, N]."""
    m, k = a.shape
    n = b.shape[0]
    out = common.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m == 0 or n == 0:
        return out
    assert k % BLOCK_K.value == 0, f"fp8_gemm: K = {k} is not a multiple of {BLOCK_K.value}"
    n_kb = k // BLOCK_K.value
    assert b_s.shape == (runtime.cdiv(n, 128), n_kb), f"fp8_gemm: weight scales {tuple(b_s.shape)} for {n}x{k}"
    bs, b_e8m0 = common.scale_arg(b_s)
    if fuse_quant:
        as_, a_e8m0, stride_asm = a, False, 0  # unused
    else:
        assert a_s.shape == (m, n_kb), f"fp8_gemm: activation scales {tuple(a_s.shape)} for {m}x{k}"
        as_, a_e8m0 = common.scale_arg(a_s)
        stride_asm = as_.stride(0)
    chunk = common.chunk_blocks(n_kb)
    chunks = common.n_chunks(n_kb)
    small = m <= SMALL_M
    if split is None:
        # split K only where the largest small-M tiles cannot occupy the SMs
        split = small and chunks > 1 and runtime.cdiv(n, 128) * runtime.cdiv(m, 16) < runtime.sm_count(a.device)
    split = split and chunks > 1
    in_launch = split and common.reduce_in_launch(m)
    ws, cnt = common.split_buffers(split, chunks, m, n, out, _SMALLEST)
    kernel = _small if small else _large
    t_fast = not small and not split  # prefill: the CTAs resident at once share weight tiles
    # prefill: operands through TMA descriptors (H100, session 15, 4096 tokens, the same bits: Pro wo_b 1.75 -> 1.43
    # ms, Pro wq_b 2.00 -> 1.65; Flash wq_b 0.554 -> 0.626 there, 0.552 in session 16's rerun: that row's spread);
    # they need 16-byte aligned bases (row strides are K bytes, a multiple of 128)
    tma = t_fast and b.data_ptr() % 16 == 0 and (fuse_quant or a.data_ptr() % 16 == 0)

    def grid(meta):
        w_tiles, t_tiles = runtime.cdiv(n, meta["BLOCK_W"]), runtime.cdiv(m, meta["BLOCK_T"])
        return (t_tiles, w_tiles, 1) if t_fast else (w_tiles, t_tiles, chunks if split else 1)

    with common.on_device(a), common.split_reduction(ws, out, split, in_launch):
        kernel[grid](
            a, as_, b, bs, out, ws, cnt,
            m, n, k, n_kb, chunk, common.bucket(m),
            a.stride(0), stride_asm, b.stride(0), bs.stride(0), out.stride(0),
            A_E8M0=a_e8m0, B_E8M0=b_e8m0, FUSE_QUANT=fuse_quant,
            CHUNKED=chunk > 1, SPLIT=split, IN_LAUNCH=in_launch, DOT_F64=runtime.interpreting(), T_FAST=t_fast, TMA=tma,
            **common.NO_FMA,
        )  # fmt: skip
    return out


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
    *,
    _split: bool | None = None,
) -> torch.Tensor:
    """C = A . B^T with per-128 FP8 block scales on both sides (the official `fp8_gemm` contract).

    Args:
        a (torch.Tensor): e4m3 `[..., K]`; a_s: `[..., K/128]` per (row, 128-group) scales, e8m0 or fp32.
        b (torch.Tensor): e4m3 `[N, K]`; b_s: `[ceil(N/128), K/128]` per 128x128 block scales, e8m0 or fp32.
        _split (bool, Optional): tests only: force (True) or forbid (False) the split-K launch.

    Returns:
        `[..., N]` in torch's default dtype (bf16 values).
    """
    assert a.is_contiguous() and b.is_contiguous(), "Input tensors must be contiguous"
    assert a_s.is_contiguous() and b_s.is_contiguous(), "Scaling factor tensors must be contiguous"
    assert a.dtype == torch.float8_e4m3fn and b.dtype == torch.float8_e4m3fn, (a.dtype, b.dtype)
    k = a.size(-1)
    out = _launch(a.view(-1, k), a_s.view(-1, a_s.size(-1)), b, b_s, False, _split)
    return out.view(*a.shape[:-1], b.shape[0]).to(torch.get_default_dtype())


def fp8_linear(
    x: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, *, _split: bool | None = None
) -> torch.Tensor:  # fmt: skip
    """act_quant(x, 128, "ue8m0") fused in front of `fp8_gemm`: bf16 `[..., K]` x e4m3 `[N, K]` -> `[..., N]`.
    Equal bit for bit to the two ops in sequence (the activation scales are powers of two, as with scale_fmt
    "ue8m0"; whether they are stored as e8m0 or fp32 does not change a value)."""
    assert x.dtype == torch.bfloat16 and b.dtype == torch.float8_e4m3fn, (x.dtype, b.dtype)
    assert b.is_contiguous() and b_s.is_contiguous()
    k = x.size(-1)
    out = _launch(x.reshape(-1, k).contiguous(), None, b, b_s, True, _split)
    return out.view(*x.shape[:-1], b.shape[0]).to(torch.get_default_dtype())

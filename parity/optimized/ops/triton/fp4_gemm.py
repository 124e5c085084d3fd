"""Triton FP8-activation x FP4-weight GEMM: C[M, N] = A[M, K] . B[N, K]^T, bf16 out.

Reference: parity.reference.kernels.fp4_gemm (the official TileLang `fp4_gemm`, spec §3.5).

Block structure (spec §3.5): 32-wide K blocks in ascending order; the packed e2m1 weights (two per byte, low nibble
first, spec §2.2) are decoded in registers to e4m3 bytes holding fp4 * 2^-6 (exact; four ALU ops per weight, the
2^6 folded into the power-of-two weight scale), P_k = A_k . B_k^T
on FP8 tensor cores (fp32, from zero per block), C_acc += (P_k * sa[m, k/4]) * sb[n, k] with the activation's
per-128 scale and the weight's per-32 scale; bf16 (round to nearest even) at the end. K > 8 blocks: the fp32 sum is
grouped in K-only chunks (`_gemm_common`), which keeps split-K batch-invariant.

A loop trip is `_gemm_common.fp4_trip`, which moe_experts' `_mm_fp4` runs too (the trip's docstring has the
compiled instruction counts): the activations enter the MMA in the pairs order (`_gemm_common.pairs_order`) so that
a block's packed bytes decode to its two nibble halves with no byte shuffles. Decode launches with K <= NATURAL_MAX_K
read A in K order and permute each block in registers (X_NATURAL); the others take one torch copy of A in that
order. The copy is one more launch per call (2.3 us of a 10.4 us Flash w1 one-token call on the H100), the
permutation a shared-memory round trip per block (compiled for sm_90, 64 x 16 tiles: 446 against 390 instructions
and 16 against 8 barriers a trip), paid per loop trip: H100, graph ms, two alternated rounds (session 17): Flash w1
and w2 (K 4096, 2048) 1 / 8 tokens 0.0102 -> 0.0087, 64 tokens 0.0159 -> 0.0145 and 0.0196 -> 0.0180; Pro w2 (K
3072) 0.0181 -> 0.0170 at one token, 0.0314 -> 0.0322 at 64; Pro w1 (K 7168, 56 trips) 0.0166 -> 0.0173 at one
token: it keeps the copy. With e8m0 scales on
both sides (every scale a power of two) the chunk sum is carried divided by the activation's scale, B = C / sa, and
each block adds P * sb as one fma: the same bits ((P * sa) * sb = sa * (P * sb) and the rounding commute with a
power of two) while nothing leaves fp32's normal range. A chunk's sum is added to the total by a branch at the end
of the loop trip that ends the chunk.

Layout as in `fp8_gemm`: weight rows on the MMA's M side (BLOCK_W), tokens on its N side (BLOCK_T), split K over
chunks for small-M launches that would leave SMs idle, the chunk sums added in order by the last program to finish
each output tile, in the same launch (`_gemm_common.store_tile`). A loop trip handles four 32-blocks (one activation
128-group: one scale load, 64 weight bytes per row in flight instead of 16), still scaled and added one by one.

Numerics vs the twin: each 32-wide block product is one FP8 MMA on the GPU (an exact float64 dot rounded once to
fp32 in the interpreter, as in fp8_gemm) instead of the twin's exact sum; the scaling and accumulation are the
twin's. Within the FP8 block-product allowance plus one bf16 ulp of the float64 math beyond the twin's own error.
Unverified without a GPU: the MMA bits, batch invariance across autotuned tile widths, the performance (compiled
for sm_90 on CPU: `python bench/triton_gemm.py --compile-check`).
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import runtime

# the FP4 weight scale block along K (one MMA K step); a constexpr: a plain global int is invisible to compiled kernels
BLOCK_K = tl.constexpr(32)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one compile for every token count
def _fp4_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, cnt_ptr,
    M, N, K, N_KB, CHUNK_KB, M_BUCKET,
    stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
    A_E8M0: tl.constexpr, B_E8M0: tl.constexpr, POW2: tl.constexpr,
    CHUNKED: tl.constexpr, SPLIT: tl.constexpr, IN_LAUNCH: tl.constexpr, DOT_F64: tl.constexpr, SUB: tl.constexpr,
    X_NATURAL: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # output features n
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
    # the 32 weights of a K block are 16 contiguous bytes of the row (one 16-byte load), element 2b in the low
    # nibble of byte b (spec §2.2)
    k0 = kb_begin * BLOCK_K
    b_ptrs = b_ptr + offs_w[:, None] * stride_bn + (k0 // 2 + tl.arange(0, BLOCK_K // 2))[None, :]
    a_ptrs = a_ptr + offs_t[None, :] * stride_am + (k0 + offs_k)[:, None]  # [32, BLOCK_T], K-major
    as_row = as_ptr + offs_t * stride_asm
    bs_ptrs = bs_ptr + offs_w[:, None] * stride_bsn + tl.arange(0, SUB)[None, :]  # a loop trip's SUB weight scales
    total = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    part = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    # the scales are read one loop trip ahead: a byte or four a row are too narrow for the pipeliner's async copies,
    # and a plain load in the trip that uses it waits out a whole memory latency (compiled for sm_90, the loop held
    # five such loads per trip)
    sa_next = tl.load(as_row + kb_begin // 4, mask=mask_t)
    sb_next = tl.load(bs_ptrs + kb_begin, mask=mask_w[:, None])
    # SUB 32-blocks (one 128-group of the activation when SUB = 4) per loop trip: 4x larger loads in flight per
    # trip than one 16-byte weight slice per row; the blocks are still scaled and summed one by one in ascending k
    for kb4 in range(kb_begin, kb_end, SUB):
        sa = sa_next  # the activation's 128-group holding these 32-blocks
        sb4 = sb_next
        more = kb4 + SUB < kb_end
        sa_next = tl.load(as_row + (kb4 + SUB) // 4, mask=mask_t & more)
        sb_next = tl.load(bs_ptrs + (kb4 + SUB), mask=mask_w[:, None] & more)
        if A_E8M0:
            sa = common.e8m0_to_f32(sa)
        mw, mt = mask_w[:, None], mask_t[None, :]
        if CHUNKED:  # the chunk's sum, carried divided by sa under POW2 (`_gemm_common.fp4_trip`)
            part = common.fp4_trip(
                part, b_ptrs, a_ptrs, mw, mt, sb4, sa[None, :], B_E8M0, SUB, POW2, DOT_F64, X_NATURAL
            )
            # a chunk ends on a trip's end (its blocks are a multiple of SUB): a branch taken once a chunk
            if ((kb4 + SUB) % CHUNK_KB == 0) | (kb4 + SUB >= kb_end):
                total += part
                part = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
        else:  # one block per chunk: the twin's own order, one accumulator fewer
            total = common.fp4_trip(
                total, b_ptrs, a_ptrs, mw, mt, sb4, sa[None, :], B_E8M0, SUB, False, DOT_F64, X_NATURAL
            )
        b_ptrs += SUB * BLOCK_K // 2
        a_ptrs += SUB * BLOCK_K
    mask = mask_w[:, None] & mask_t[None, :]
    common.store_tile(total, c_ptr, ws_ptr, cnt_ptr, offs_w, offs_t, mask, M, N, stride_cm, SPLIT, IN_LAUNCH)


def _configs(small_m: bool):
    if runtime.interpreting():
        return [triton.Config({"BLOCK_W": 128, "BLOCK_T": 256}, num_warps=4)]
    # (BLOCK_W, BLOCK_T, warps, stages): wgmma when compiled for sm_90 (bench --compile-check); decode offers
    # one token tile up to 64 tokens; prefill one warpgroup on 128 x 64 (see fp8_gemm's configurations)
    if small_m:
        # deeper pipelines since the scales are read a trip ahead (only the weight and activation tiles are in
        # shared memory: 6 KB a stage at 64 x 16)
        shapes = [(64, 16, 4, 4), (64, 64, 4, 4), (128, 16, 4, 4), (64, 16, 4, 8), (128, 16, 4, 6)]
    else:
        shapes = [(128, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 3)]
    return [triton.Config({"BLOCK_W": w, "BLOCK_T": t}, num_warps=nw, num_stages=st) for w, t, nw, st in shapes]


_KEY = ["N", "K", "M_BUCKET", "A_E8M0", "B_E8M0", "SPLIT", "IN_LAUNCH", "X_NATURAL"]
_small = common.autotune(_configs(True), _KEY)(_fp4_gemm_kernel)
_large = common.autotune(_configs(False), _KEY)(_fp4_gemm_kernel)
# the smallest tiles of any configuration: bounds a split launch's output tiles (one arrival counter each)
_SMALLEST = common.smallest_tile(_small, _large)  # a split launch's arrival counters (`split_buffers`)

SMALL_M = 64
NATURAL_MAX_K = 4096  # decode launches up to this K permute A in registers instead of copying it (module docstring)


def fp4_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
    *,
    _split: bool | None = None,
) -> torch.Tensor:
    """C = A_fp8 . B_fp4^T (the official `fp4_gemm` contract): 32-wide K blocks, C += (P * sa) * sb.

    Args:
        a (torch.Tensor): e4m3 `[..., K]`; a_s: `[..., K/128]` activation scales (e8m0 or fp32).
        b (torch.Tensor): `float4_e2m1fn_x2` (or int8/uint8 bytes) `[N, K/2]`, low nibble first; b_s: `[N, K/32]`
            e8m0 (or fp32) weight scales.
        _split (bool, Optional): tests only: force (True) or forbid (False) the split-K launch.

    Returns:
        `[..., N]` in torch's default dtype (bf16 values).
    """
    assert a.is_contiguous() and b.is_contiguous(), "Input tensors must be contiguous"
    assert a_s.is_contiguous() and b_s.is_contiguous(), "Scaling factor tensors must be contiguous"
    assert a.dtype == torch.float8_e4m3fn, a.dtype
    k = a.size(-1)
    m = a.numel() // k
    n = b.size(0)
    assert k % 128 == 0 and b.size(1) * 2 == k, f"fp4_gemm: K = {k}, packed weight {tuple(b.shape)}"
    n_kb = k // BLOCK_K.value
    a2, as2 = a.view(m, k), a_s.view(m, -1)
    assert as2.shape == (m, k // 128) and b_s.shape == (n, n_kb), (tuple(a_s.shape), tuple(b_s.shape))
    out = common.empty(m, n, dtype=torch.bfloat16, device=a.device)
    if m and n:
        asc, a_e8m0 = common.scale_arg(as2)
        bsc, b_e8m0 = common.scale_arg(b_s)
        bytes_ = b.view(torch.uint8)
        chunk, chunks = common.chunk_blocks(n_kb), common.n_chunks(n_kb)
        small = m <= SMALL_M
        natural = small and k <= NATURAL_MAX_K
        split = _split
        if split is None:
            split = small and runtime.cdiv(n, 128) * runtime.cdiv(m, 16) < runtime.sm_count(a.device)
        split = split and chunks > 1
        in_launch = split and common.reduce_in_launch(m)
        # 4 blocks per loop trip need every program's K range to start and end on a 128-group (K % 128 == 0 makes
        # the whole range do; a split chunk must be a multiple of 4 blocks), and chunks of several blocks to end on
        # a trip's end (the flush is at the end of a trip)
        sub = 4 if chunk % 4 == 0 or (chunk == 1 and not split) else 1
        ws, cnt = common.split_buffers(split, chunks, m, n, out, _SMALLEST)

        def grid(meta):
            return (runtime.cdiv(n, meta["BLOCK_W"]), runtime.cdiv(m, meta["BLOCK_T"]), chunks if split else 1)

        with common.on_device(a), common.split_reduction(ws, out, split, in_launch):
            (_small if small else _large)[grid](
                a2 if natural else common.pairs_order(a2), asc, bytes_, bsc, out, ws, cnt,
                m, n, k, n_kb, chunk, common.bucket(m),
                a2.stride(0), asc.stride(0), bytes_.stride(0), bsc.stride(0), out.stride(0),
                A_E8M0=a_e8m0, B_E8M0=b_e8m0, POW2=a_e8m0 and b_e8m0, CHUNKED=chunk > 1, SPLIT=split,
                IN_LAUNCH=in_launch,
                DOT_F64=runtime.interpreting(), SUB=sub, X_NATURAL=natural, **common.NO_FMA,
            )  # fmt: skip
    return out.view(*a.shape[:-1], n).to(torch.get_default_dtype())

"""Triton unquantized linear over ragged tokens: y[T, N] = x[T, K] . w[N, K]^T, fp32 accumulation.

Reference: parity.reference.model.Compressor.forward (its fp32 `F.linear` projections wkv / wgate; also the
indexer's bf16 weights_proj and the gate's fp32 score GEMM, spec §6.2, §7.2, §9.1).

fp32 operands (compressor wkv / wgate, the head's logits) run as "tf32x3" on the tensor cores: each operand split
into a TF32 head and its exact remainder, three TF32 products per term (see `linear` for what that drops: at most
~10 units of 2^-23 |a b| per product, against the K units of fp32 summation the op is allowed). The exact form
(`input_precision="ieee"`: fp32 products and sums on the FMA units, as the twin with TF32 off, spec §12.1) is
3-6x slower at decode on the H200 and stays as `linear(_precision="ieee")` for the benchmark. bf16 operands
(indexer weights_proj; the gate's scores, see moe_gate) use the bf16 tensor cores: every product of two bf16
values is exact in fp32, so only the fp32 summation order differs from cuBLAS / MKL. Output in x's dtype (bf16
rounded to nearest even), or fp32 when asked.

One order for every batch: K is cut into at most 8 chunks of a K-only size (a multiple of 128); each chunk's fp32
sum starts from zero and the chunk sums are added in ascending order, in registers or, for decode-sized batches
that leave SMs idle, through the ordered split-K reduction of `_gemm_common`. So a row's bits depend neither on its
batchmates nor on the tile sizes the autotuner picks (same as fp8_gemm); every config has the same BLOCK_K, since
the tf32x3 form sums each BLOCK_K step's products apart before adding them to the chunk sum. `cu_seqlens` is
accepted and ignored: rows are independent here, unlike the torch backend whose BLAS rounds by row count.

Numerics vs the twin: within the twin's distance to the float64 product plus (K + TF32X3_UNITS) * 2^-23 of the
terms' absolute sum (fp32 recursive summation in any order, K units; what tf32x3's products drop, the rest; the
constant lives in ops.dense_linear) plus one ulp of the output. The CUDA op tests check the same bits for a row
alone and among batchmates, in small and large tiles, split and unsplit; the interpreter runs every form as a
float64 dot of the exact products, rounded once per BLOCK_K step.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _gemm_common as common
from parity.optimized.ops.triton import runtime


@triton.jit(do_not_specialize=["M", "M_BUCKET"])
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, CHUNK_K, M_BUCKET,
    stride_xm, stride_wn, stride_ym,
    SPLIT: tl.constexpr, IN_LAUNCH: tl.constexpr, PRECISION: tl.constexpr, DOT_F64: tl.constexpr,
    BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_w = tl.program_id(0)
    pid_t = tl.program_id(1)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # output features (weight rows): the MMA's M side
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # tokens: its N side
    offs_k = tl.arange(0, BLOCK_K)
    mask_w = offs_w < N
    mask_t = offs_t < M
    if SPLIT:
        k_begin = tl.program_id(2) * CHUNK_K
        k_end = tl.minimum(k_begin + CHUNK_K, K)
    else:
        k_begin = 0
        k_end = K
    w_ptrs = w_ptr + offs_w[:, None] * stride_wn + (k_begin + offs_k)[None, :]
    x_ptrs = x_ptr + offs_t[None, :] * stride_xm + (k_begin + offs_k)[:, None]  # [BLOCK_K, BLOCK_T], K-major
    total = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    part = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        w = tl.load(w_ptrs, mask=mask_w[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_t[None, :], other=0.0)
        if DOT_F64:
            # interpreter: numpy's fp32 GEMM sums a column in an order that depends on its position in the tile
            # (OpenBLAS edge kernels), which would make a row's bits depend on its batchmates; a float64 dot of
            # the exact products, rounded once per K block, does not
            part += tl.dot(w.to(tl.float64), x.to(tl.float64), input_precision="ieee").to(tl.float32)
        elif PRECISION != "":  # fp32 operands: "tf32x3" (the op), "ieee" (exact, FMA units), bf16x6 / bf16x3
            part = tl.dot(w, x, part, input_precision=PRECISION)
        else:  # bf16 operands: exact products on the tensor cores
            part = tl.dot(w, x, part)
        if ((k0 + BLOCK_K) % CHUNK_K == 0) | (k0 + BLOCK_K >= k_end):  # a K chunk is complete
            total += part
            part = tl.zeros((BLOCK_W, BLOCK_T), dtype=tl.float32)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    mask = mask_w[:, None] & mask_t[None, :]
    common.store_tile(total, y_ptr, ws_ptr, cnt_ptr, offs_w, offs_t, mask, M, N, stride_ym, SPLIT, IN_LAUNCH)


BLOCK_K = 32  # K per tensor-core step, the same in every config (the interpreter's is 128: it is never timed)


def _configs(small_m: bool):
    if runtime.interpreting():
        return [triton.Config({"BLOCK_W": 128, "BLOCK_T": 128, "BLOCK_K": 128}, num_warps=4)]
    # (BLOCK_W, BLOCK_T, BLOCK_K, warps, stages): one BLOCK_K for all (the tf32x3 form's bits depend on it)
    if small_m:
        shapes = [(64, 16, BLOCK_K, 4, 3), (64, 16, BLOCK_K, 4, 5), (64, 32, BLOCK_K, 4, 3)]
    else:
        shapes = [(64, 64, BLOCK_K, 4, 3), (128, 64, BLOCK_K, 8, 3)]
    return [
        triton.Config({"BLOCK_W": w, "BLOCK_T": t, "BLOCK_K": k}, num_warps=nw, num_stages=st)
        for w, t, k, nw, st in shapes
    ]


# K-chunk boundaries are multiples of 128, which BLOCK_K divides
_KEY = ["N", "K", "M_BUCKET", "SPLIT", "IN_LAUNCH", "PRECISION"]
_small = common.autotune(_configs(True), _KEY)(_linear_kernel)
_large = common.autotune(_configs(False), _KEY)(_linear_kernel)
SMALL_M = 64
_SMALLEST = common.smallest_tile(_small, _large)  # a split launch's arrival counters (`split_buffers`)
FP32_FORM = "tf32x3"  # the op's form for fp32 operands; the others are the benchmark's (`linear(_precision=...)`)
PRECISIONS = ("tf32x3", "ieee", "bf16x6", "bf16x3")


def chunk_k(k: int) -> int:
    """Elements per K chunk: a multiple of 128, at most 8 chunks; a function of K only."""
    return 128 * common.chunk_blocks(runtime.cdiv(k, 128))


def linear(
    x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None, *, _split=None, _precision=None
):  # fmt: skip
    """x `[M, K]` . weight `[N, K]`^T with fp32 accumulation; fp32 operands (both) or bf16 operands (both).
    Returns `[M, N]` in `out_dtype` (default: x's dtype).

    `_precision` (benchmark only) picks the fp32 operands' form among `PRECISIONS`; None is the op's, FP32_FORM
    (bf16 operands ignore it). "ieee" is the exact form: fp32 products and FMA sums on the FMA units. The others go
    through `tl.dot(input_precision=...)`, which Triton 3.6 rewrites (its F32DotTC pass; checked in the sm_90 TTGIR)
    into tensor-core products of split operands: per BLOCK_K step the correction products are summed from zero in the
    MMA accumulator, NaNs in that sum zeroed (an inf operand then gives inf, not NaN), the head x head product added
    last, and the result added to the chunk sum with one fp32 add. Per product a * b, what each drops (for
    normal-range values; unit: 2^-23 |a * b|):
      "tf32x3": a = big + small, big = cvt.rna.tf32(a) (11 significant bits), small = a - big (exact); products
        small*big + big*small + big*big on TF32 wgmma. Dropped: small*small (<= 2^-22, 2 units) and, the tensor
        core reading only small's TF32 bits, its low bits (<= 2^-21 per side): about 10 units at most.
      "bf16x6": a = hi + mid + lo, three bf16 (8 significant bits each, each the round-to-nearest of what is left);
        the six products whose pieces' ranks sum to <= 2 (hi*hi, hi*mid, mid*hi, hi*lo, lo*hi, mid*mid) on bf16
        wgmma, each exact in fp32. Dropped: mid*lo, lo*mid, lo*lo and the split's remainder (<= 2^-24 |a| per side):
        about 2 units, so nearly fp32-exact products.
      "bf16x3": a = hi + mid (two bf16); products hi*hi + hi*mid + mid*hi. Dropped: mid*mid and the remainder
        (<= 2^-16 |a| per side): about 3 * 2^-16, 384 units at most, far above the other two.
    The sums run in wgmma's fp32 accumulator, whose rounding NVIDIA does not specify. Measured on the H200 at V4-Pro
    shapes (docs/perf.md, tenth pass; max error in units of 2^-23 of the absolute term sum, the op's allowance being
    K of them): tf32x3 0.10-0.22 units, 1.00 ms for the head's 1-token logits GEMM (exact form 4.76 ms, bf16x6 1.13,
    bf16x3 0.86 at 2.8-3.7 units). tf32x3 is the op's form: as fast as bf16x3 within 15 %, as accurate as bf16x6.
    Under the interpreter every form runs as the float64 dot (its `tl.dot` knows neither bf16x3 nor bf16x6)."""
    precision = _precision or FP32_FORM
    assert precision in PRECISIONS, precision
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k, (tuple(x.shape), tuple(weight.shape))
    assert x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16), (x.dtype, weight.dtype)
    out = common.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    ck = chunk_k(k)
    chunks = runtime.cdiv(k, ck)
    small = m <= SMALL_M
    split = _split
    if split is None:
        split = small and runtime.cdiv(n, 64) * runtime.cdiv(m, 16) < runtime.sm_count(x.device)
    split = split and chunks > 1
    # the chunk sums added in chunk order by the last program of each output tile (`_gemm_common.store_tile`), or by
    # a second launch for larger batches: the same additions either way
    in_launch = split and common.reduce_in_launch(m)
    ws, cnt = common.split_buffers(split, chunks, m, n, out, _SMALLEST)

    def grid(meta):
        return (runtime.cdiv(n, meta["BLOCK_W"]), runtime.cdiv(m, meta["BLOCK_T"]), chunks if split else 1)

    with common.on_device(x), common.split_reduction(ws, out, split, in_launch):
        (_small if small else _large)[grid](
            x, weight, out, ws, cnt,
            m, n, k, ck, common.bucket(m),
            x.stride(0), weight.stride(0), out.stride(0),
            SPLIT=split, IN_LAUNCH=in_launch, PRECISION=precision if x.dtype == torch.float32 else "",
            DOT_F64=runtime.interpreting(),
        )  # fmt: skip
    return out


def dense_linear(x: torch.Tensor, weight: torch.Tensor, cu_seqlens=None) -> torch.Tensor:
    """x `[T, K]` . weight `[N, K]`^T in x's dtype (fp32 or bf16) -> `[T, N]`; `cu_seqlens` is ignored (rows are
    computed alone, whatever their segments)."""
    return linear(x, weight)

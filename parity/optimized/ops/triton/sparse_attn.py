"""Triton `sparse_attn`: sparse MQA with a per-head sink over KV rows read by index from several sources.

Reference: parity.reference.kernels.sparse_attn (the official TileLang `sparse_attn_kernel`, spec §8), called by the
op per query on the rows `idx` selects from the virtual concatenation of `sources` (chunk KV, window ring, paged
compressed entries; -1 = none).

Structure (spec §8), one program per (query token, block of heads[, half of d]), prefill and decode rows in one
launch:
- the query's heads `[BH, d]` are loaded once; its index row is walked in 64-slot blocks in list order, up to its
  last valid slot, which the program finds itself from the index row (`n_blocks`: torch ops on the host would be
  launches, and launches bounded the small decode batches); the batch pads rows with trailing -1 to its widest
  list; those blocks are exactly an identity once m is finite, so they are skipped; a row without any valid slot
  still runs one block and gives the twin's NaN;
- each block's rows are read straight from their source (up to four base pointers, the source picked per slot from
  the virtual row id; no gathered copy; asynchronous copies into shared memory on sm_90), -1 (or any negative id)
  masks the slot, an id past the last source reads zeros like the twin's gather;
- S = q . K^T (bf16 MMA, fp32 accumulate), S = where(valid, S, -inf) * scale, running max m_new = max(m, rowmax S),
  alpha = exp(m - m_new), P = exp(S - m_new) in fp32, l = fma(l, alpha, sum P), acc = acc * alpha + bf16(P) . V
  (bf16 MMA into the fp32 accumulator): bf16-rounded P for the value product, fp32 P for the denominator;
- at the end l += exp(sink - m) (the sink is not scaled and has no value), o = acc / l (IEEE division), RNE to bf16;
- exp is a portable fp32 Cody-Waite exp (reduction by a split ln 2, degree-7 polynomial, 2^k from the bits):
  ~1 ulp of the correctly rounded exp the twin uses; arguments below -87.3 give 0 (the twin keeps fp32 subnormals,
  < 1.2e-38, which no output can see).
On the GPU the head block, warps, pipeline depth and output parts are fixed per (heads, head dim) (`default_config`;
not autotuned: a row's bits must not depend on its batch size or on which configuration won a timing race). The
KV list of a row is never split over programs (no flash-decoding split): a split would round each P to bf16
relative to its piece's running max instead of the twin's running max, a rounding freedom the tolerance below does
not grant, and choosing the split by batch size would make a row's bits depend on its batch. The CPU interpreter
runs a second kernel with the same per-query math on up to 128 queries per program (batched 3-D dots):
it pays per program and per op, not per element; the tests check that both kernels give the same bits.

Not bitwise: the twin takes each MMA as an exact sum rounded once; the tensor cores (and the interpreter's BLAS)
round partial sums in their own order, and exp differs by ~1 ulp. A score that moves by a few fp32 ulp can flip the
bf16 rounding of its P (spec §12.3: "expect rare 1-ulp bf16 differences"), which moves that head's outputs by one
bf16 ulp of P_i * v_i / l; and outputs that nearly cancel (|o| << sum |P_i v_i| / l) carry fp32 noise of other
summation orders beyond their own bf16 ulp. The tests check every other output to the twin's error + 1 ulp of the
float64 math and bound these two cases explicitly (tests/optimized/ops/test_sparse_attn.py).

Speed on the H200 (docs/perf-h200/triton_attention.md, 2026-12-03): Flash decode CSA ctx 64k K 640 T 256 0.20 ms
(19.6 % of copy bandwidth on the KV bytes; the target is 50 %), T 1 0.09 ms (0.08 in a CUDA graph: ~8 us per
64-slot block, one program's serial latency), prefill 4k 2.14 ms (16 % of bf16 peak; target 40 %). The 64-head
block is the fastest configuration measured; splitting d over two programs (parts 2) was 1.3-1.7x slower.

On sm_90 the wrapper runs the Gluon kernel of `sparse_attn_wgmma.py` instead (the same per-query math but for the
exp, CUDA's expf as in the official kernel; scores split over the two warpgroups, KV rows copied asynchronously one
block ahead): on an H100, Flash decode T 256 0.197 -> 0.107 ms, prefill 4k 2.14 -> 1.11 ms, in CUDA graphs
(docs/perf.md, twenty-sixth pass).
This kernel runs in the interpreter, on other GPUs, for rows that kernel cannot copy, and for a given `config`.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime, sparse_attn_wgmma
from parity.optimized.ops.triton._attn_common import BLOCK_N, exp_f32, exp_nonpos, n_blocks, row_address

MAX_SOURCES = 4


# the index width K (and its row stride) grows with the context: not specialized, or decode steps would compile
# a variant whenever it crossed a multiple of 16
@triton.jit(do_not_specialize=["K", "idx_st"])
def _sparse_attn_kernel(
    q_ptr, o_ptr, idx_ptr, sink_ptr,
    s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3,
    H, K, q_st, q_sh, idx_st, scale,
    D: tl.constexpr, DP: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, NPART: tl.constexpr,
):  # fmt: skip
    # one flat grid, the programs of a token adjacent (head blocks, then output parts): they run together and share
    # its KV rows through L2
    n_hb = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    part = pid % NPART
    t = (pid // NPART // n_hb).to(tl.int64)
    heads = (pid // NPART % n_hb) * BH + tl.arange(0, BH)
    hmask = heads < H
    # NPART = 2: this program writes the output dims `own` (half of d) and keeps a [BH, d/2] accumulator; the
    # scores need all of d, so it reads the other half too (`oth`, the twin program's own half: an L2 hit)
    DV: tl.constexpr = DP // NPART
    own = part * DV + tl.arange(0, DV)
    q_rows = q_ptr + t * q_st + heads[:, None] * q_sh
    q = tl.load(q_rows + own[None, :], mask=hmask[:, None] & (own < D)[None, :], other=0.0)
    if NPART == 2:
        oth = (1 - part) * DV + tl.arange(0, DV)
        q_oth = tl.load(q_rows + oth[None, :], mask=hmask[:, None] & (oth < D)[None, :], other=0.0)
    m = tl.full([BH], float("-inf"), tl.float32)
    den = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, DV], tl.float32)
    one = tl.arange(0, 1)
    nblk = tl.max(n_blocks(idx_ptr + t * idx_st + one, one < 1, K, BN, tl.arange(0, 512)), axis=0)
    for b in range(0, nblk):
        slots = b * BN + tl.arange(0, BN)
        r = tl.load(idx_ptr + t * idx_st + slots, mask=slots < K, other=-1).to(tl.int64)
        valid = r >= 0
        ptr = row_address(r, s0, s1, s2, s3, c1, c2, c3, st0, st1, st2, st3)
        inside = valid & (r < c4)
        kv = tl.load(ptr[:, None] + own[None, :], mask=inside[:, None] & (own < D)[None, :], other=0.0)  # [BN, DV]
        s = tl.dot(q, tl.trans(kv))  # [BH, BN] fp32
        if NPART == 2:
            # the other half's product accumulates onto the own half's (Triton folds a separate fp32 add into the
            # MMA accumulator anyway): the two programs of a head sum the halves in opposite orders, so a score may
            # differ by its MMA rounding between them, the same freedom any MMA order has (the tolerance)
            kv_oth = tl.load(ptr[:, None] + oth[None, :], mask=inside[:, None] & (oth < D)[None, :], other=0.0)
            s = tl.dot(q_oth, tl.trans(kv_oth), s)
        s = tl.where(valid[None, :], s, float("-inf")) * scale
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = exp_nonpos(m - m_new)
        p = exp_nonpos(s - m_new[:, None])
        den = tl.fma(den, alpha, tl.sum(p, axis=1))
        acc = tl.dot(p.to(tl.bfloat16), kv, acc * alpha[:, None])
        m = m_new
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    den = den + exp_f32(sink - m)
    o = tl.math.div_rn(acc, den[:, None])
    tl.store(o_ptr + t * H * D + heads[:, None] * D + own[None, :], o.to(tl.bfloat16),
             mask=hmask[:, None] & (own < D)[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["T", "K", "idx_st"])
def _sparse_attn_tokens_kernel(
    q_ptr, o_ptr, idx_ptr, sink_ptr,
    s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3,
    T, H, K, q_st, q_sh, idx_st, scale,
    D: tl.constexpr, DP: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # the same per-query math as _sparse_attn_kernel for BT queries at once (batched [BT, ...] tensors and 3-D
    # dots): the CPU interpreter pays per program and per op, not per element
    tok = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT).to(tl.int64)
    tmask = tok < T
    heads = tl.arange(0, BH)
    hmask = heads < H
    dims = tl.arange(0, DP)
    dmask = dims < D
    qmask = tmask[:, None, None] & hmask[None, :, None] & dmask[None, None, :]
    q = tl.load(q_ptr + tok[:, None, None] * q_st + heads[None, :, None] * q_sh + dims[None, None, :], mask=qmask,
                other=0.0)  # fmt: skip
    m = tl.full([BT, BH], float("-inf"), tl.float32)
    den = tl.zeros([BT, BH], tl.float32)
    acc = tl.zeros([BT, BH, DP], tl.float32)
    nblk = n_blocks(idx_ptr + tok * idx_st, tmask, K, BN, tl.arange(0, 512))
    for b in range(0, tl.max(nblk, axis=0)):
        slots = b * BN + tl.arange(0, BN)
        run = tmask & (b < nblk)  # [BT]: queries whose list still has this block
        r = tl.load(idx_ptr + tok[:, None] * idx_st + slots[None, :], mask=run[:, None] & (slots < K)[None, :],
                    other=-1).to(tl.int64)  # fmt: skip
        valid = r >= 0
        ptr = row_address(r, s0, s1, s2, s3, c1, c2, c3, st0, st1, st2, st3)
        inside = valid & (r < c4)
        kv = tl.load(ptr[:, :, None] + dims[None, None, :], mask=inside[:, :, None] & dmask[None, None, :],
                     other=0.0)  # fmt: skip
        s = tl.dot(q, tl.permute(kv, (0, 2, 1)))  # [BT, BH, BN]
        s = tl.where(valid[:, None, :], s, float("-inf")) * scale
        m_new = tl.maximum(m, tl.max(s, axis=2))
        alpha = exp_nonpos(m - m_new)
        p = exp_nonpos(s - m_new[:, :, None])
        l_new = tl.fma(den, alpha, tl.sum(p, axis=2))
        acc_new = tl.dot(p.to(tl.bfloat16), kv, acc * alpha[:, :, None])
        # queries past their last block keep their state (their block would be the identity, or NaN before any
        # valid slot: the single-query kernel never runs it)
        den = tl.where(run[:, None], l_new, den)
        acc = tl.where(run[:, None, None], acc_new, acc)
        m = tl.where(run[:, None], m_new, m)
    sink = tl.load(sink_ptr + heads, mask=hmask, other=0.0)
    den = den + exp_f32(sink[None, :] - m)
    o = tl.math.div_rn(acc, den[:, :, None])
    tl.store(o_ptr + tok[:, None, None] * H * D + heads[None, :, None] * D + dims[None, None, :], o.to(tl.bfloat16),
             mask=qmask)  # fmt: skip


# GPU launch configurations (head block BH = MMA rows, warps, pipeline stages, output parts: 1 keeps a BH x d fp32
# accumulator in registers, 2 splits d over two programs of BH x d/2 each) that compile for sm_90 at d = 512
# (`bench/triton_attention.py --compile-sm90` lists registers, spills and shared memory;
# `bench/triton_attention.py` times each on the GPU).
CONFIGS = (
    (32, 8, 2, 1), (64, 8, 1, 1), (64, 8, 2, 1), (64, 8, 3, 1), (64, 8, 1, 2), (64, 8, 2, 2), (32, 8, 2, 2),
    (32, 4, 2, 2), (16, 4, 2, 2),
)  # fmt: skip


def default_config(h: int, d: int) -> tuple[int, int, int, int]:
    """The configuration the op runs with, fixed per (heads, head dim): not autotuned, because another head block,
    output split or MMA instruction could round a row differently, and a row's bits must not depend on its batch
    size or on a timing race between configurations (batch invariance, reproducible runs)."""
    if d >= 256 and h >= 64:
        # one program per 64 heads: each KV block is read once for all of them (MQA); the fastest of `CONFIGS` on
        # the H200 at Flash decode T 256 and prefill 4k: 0.20 / 2.16 ms against 0.27 / 3.25 ms for the 32-head
        # block (docs/perf-h200/triton_attention.md); it spills 104 bytes at d = 512, which costs less than it saves
        return (64, 8, 1, 1)
    if d >= 256:
        return (32, 8, 2, 1) if h >= 32 else (16, 8, 2, 1)  # no spills at d = 512
    return (16, 8, 2, 1)  # no spills at d = 64 and 128


def _rows(src: torch.Tensor, d: int) -> torch.Tensor:
    if src.dim() != 2 or src.shape[1] != d:
        raise ValueError(f"sparse_attn: every source must be [rows, {d}], got {tuple(src.shape)}")
    return src if src.stride(1) == 1 or src.shape[1] <= 1 else src.contiguous()


def sparse_attn(q, sources, idx, attn_sink, softmax_scale, tokens_per_program: int | None = None, config=None):
    """The `SparseAttn` contract: q bf16 `[T, h, d]` over rows `idx` `[T, K]` (-1 none) of the concatenated
    `sources` (each `[R_i, d]` bf16) -> bf16 `[T, h, d]`.

    `tokens_per_program`: 1 runs the one-query-per-program kernel (the GPU's), more the batched one (the
    interpreter's default); None picks by where it runs. Both compute the same per-query math. `config`: (head
    block, warps, stages, output parts) of the one-query kernel instead of `default_config` (the bench's sweep;
    the interpreter uses the head block and parts)."""
    t, h, d = q.shape
    k = idx.shape[1]
    out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    if t == 0 or h == 0 or d == 0:
        return out
    srcs = [_rows(s, d) for s in sources]
    if len(srcs) > MAX_SOURCES:  # more than the kernel's pointers: the tail as one (copied) source
        srcs = srcs[: MAX_SOURCES - 1] + [torch.cat(srcs[MAX_SOURCES - 1 :])]
    if not srcs:
        srcs = [q.new_zeros(0, d)]
    bounds, total = [], 0
    for s in srcs:
        total += s.shape[0]
        bounds.append(total)
    while len(srcs) < MAX_SOURCES:
        srcs.append(srcs[-1][:0])
        bounds.append(total)
    if q.stride(2) != 1:
        q = q.contiguous()
    idx = idx if idx.stride(-1) == 1 else idx.contiguous()
    sink = attn_sink.float().contiguous()
    dp = runtime.next_pow2(d)
    args = (q, out, idx, sink, *srcs, *bounds, *(s.stride(0) for s in srcs))
    if tokens_per_program is None:
        # the interpreter: as many queries per program as the [BT, 64, d] KV tile allows (Triton caps tensors at 2^20)
        # (a given `config` is the one-query kernel's)
        batched = runtime.interpreting() and config is None
        tokens_per_program = max(1, (1 << 20) // (BLOCK_N * dp)) if batched else 1
    if tokens_per_program > 1:
        bt = min(runtime.next_pow2(tokens_per_program), runtime.next_pow2(t))
        _sparse_attn_tokens_kernel[(runtime.cdiv(t, bt),)](
            *args, t, h, k, q.stride(0), q.stride(1), idx.stride(0), softmax_scale,
            D=d, DP=dp, BT=bt, BN=BLOCK_N,
            # compiled, tl.dot needs 16 rows; interpreted, padding heads only costs time
            BH=runtime.next_pow2(h) if runtime.interpreting() else max(16, runtime.next_pow2(h)),
        )  # fmt: skip
        return out
    if config is None and not runtime.interpreting() and sparse_attn_wgmma.fits(q, srcs):
        sparse_attn_wgmma.launch(q, out, idx, sink, srcs, bounds, softmax_scale)  # sm_90: the same math, laid out
        return out
    tail = (h, k, q.stride(0), q.stride(1), idx.stride(0), softmax_scale)
    if runtime.interpreting() and config is None:
        config = (max(16, runtime.next_pow2(h)), 4, 1, 1)  # tl.dot needs 16 rows on the GPU: the same shapes
    bh, warps, stages, parts = config or default_config(h, d)
    if parts not in (1, 2) or (parts == 2 and (dp != d or d < 32)):
        raise ValueError(f"sparse_attn: {parts} output parts of head dim {d} (1, or 2 of a power of two >= 32)")
    grid = (t * runtime.cdiv(h, bh) * parts,)
    if runtime.interpreting():
        _sparse_attn_kernel[grid](*args, *tail, D=d, DP=dp, BH=bh, BN=BLOCK_N, NPART=parts)
    else:
        _sparse_attn_kernel[grid](
            *args, *tail, D=d, DP=dp, BH=bh, BN=BLOCK_N, NPART=parts, num_warps=warps, num_stages=stages
        )
    return out

"""The Hopper (sm_90) kernel of the Triton `sparse_attn` op, written in Gluon: the same per-query math as
`sparse_attn._sparse_attn_kernel`, with the work laid out by hand.

Reference: parity.reference.kernels.sparse_attn (the official TileLang `sparse_attn_kernel`, spec §8); the op, its
contract and its rounding are described in `sparse_attn.py`, whose wrapper launches this kernel on sm_90.

Why a second kernel (docs/perf.md, twenty-first pass): for the Triton kernel's two chained dots Triton puts all 8
warps along the heads (`warpsPerCTA [8, 1]`); with a 64-head block both warpgroups then compute the same scores
S = q K^T and the same softmax, and only P V is split between them. Its KV loads are synchronous too. Here:
- the scores `[BH, BN]` are laid out `[4, 2]`: each warpgroup computes and exponentiates half of the 64 slots (the
  row max and row sum cross the two halves through shared memory), and each computes half of d of P V;
- q `[BH, d]` is copied to shared memory once; each block's KV rows `[BN, d]` are gathered by asynchronous copies
  (cp.async, 16 bytes a thread, 8 threads on 128 bytes of a row, so a thread addresses few rows) into one of two
  buffers, the next block's issued before this block is computed, from row ids read one block earlier still (a
  load the copies wait on would put a memory latency into every block);
- the bf16 P goes through shared memory to both warpgroups' P V products (wgmma reads A and B from there);
- P V is issued asynchronously and the next block's scores right behind it (they read q and the other buffer), so
  the tensor cores run both back to back while the warps wait; the buffer P V read is refilled once it is done.
The arithmetic, in order, is the Triton kernel's but for the exp: S (bf16 MMA, fp32 accumulate; another MMA
instruction shape, so another summation order), where(valid, S, -inf) * scale, the running max per 64 slots, alpha
and P, den = fma(den, alpha, sum P), acc = acc * alpha + bf16(P) . V, the sink, IEEE division, RNE to bf16. The exp
is CUDA's `expf` (libdevice `__nv_expf`: a Cody-Waite step and one MUFU.EX2, max 2 ulp), the one the official
kernel calls (spec §8 step 6) and torch's on CUDA; the Triton kernel's portable `exp_nonpos` (~1 ulp, the same bits
in the interpreter) costs about 20 instructions a score where this one costs 10. So it is judged like the Triton
kernel (tests/optimized/ops/test_sparse_attn.py: the twin's error, plus the flip and noise allowances of any MMA
summation order), not bitwise against it.

Gluon has no CPU interpreter: this kernel runs only on a GPU with sm_90 (`fits`), where every CUDA test of the op
exercises it; elsewhere (the interpreter, other GPUs, a given `config`) the wrapper runs the Triton kernel. On the
CPU, CI compiles it for sm_90 at every d of `DIMS` (tests/optimized/ops/test_compile_sm90.py: shared memory, spills).
Measured on an H100 (docs/perf.md, twenty-sixth pass): 1.8-2.0x the Triton kernel's speed, Flash decode T 256
0.107 ms in a CUDA graph (52 % of copy bandwidth on the KV rows), prefill 4k 1.11 ms (31 % of the bf16 rate); the
expf and the overlapped P V took 6 % off the portable-exp kernel's time over the A/B's five cases.
"""

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton._attn_common import BLOCK_N, expf_cuda, n_blocks, row_address

HEADS = 64  # the MMA rows of one program: one warpgroup's wgmma M; fewer heads are masked rows
WARPS = 8  # two warpgroups: each takes half of the slots of S and half of d of P V
DIMS = (64, 128, 256, 512)  # d: P V's half of d is one wgmma N (<= 256); the buffers fit shared memory at 512


@gluon.constexpr_function
def _copy_layout(d, num_warps):
    # 8 bf16 (16 bytes, one cp.async) a thread, 8 threads along d (128 bytes of a row), the warp's others over rows:
    # at d 512 a thread addresses 2 rows of a block, not 8 (row_address picks a source: a dozen int64 operations)
    tpw = min(8, d // 8)
    return gl.BlockedLayout([1, 8], [32 // tpw, tpw], [num_warps, 1], [1, 0])


@gluon.jit
def _ids(idx_row, b, K, BN: gl.constexpr, layout: gl.constexpr):
    """Block b's row ids (-1 past the list)."""
    slots = b * BN + gl.arange(0, BN, layout=layout)
    return gl.load(idx_row + slots, mask=slots < K, other=-1).to(gl.int64)


@gluon.jit
def _copy_rows(dst, r, dc, s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3):
    """Issue the copies of the rows r into dst (a valid id below the sources' end; the others are zero-filled)."""
    ptr = row_address(r, s0, s1, s2, s3, c1, c2, c3, st0, st1, st2, st3)
    cp.async_copy_global_to_shared(dst, ptr[:, None] + dc[None, :], mask=((r >= 0) & (r < c4))[:, None])


# K and its row stride grow with the context: not specialized (as the Triton kernel)
@gluon.jit(do_not_specialize=["K", "idx_st"])
def _sparse_attn_wgmma_kernel(
    q_ptr, o_ptr, idx_ptr, sink_ptr,
    s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3,
    H, K, q_st, q_sh, idx_st, scale,
    D: gl.constexpr, BH: gl.constexpr, BN: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    gl.static_assert(num_warps == 8, "two warpgroups")
    s_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BN // 2, 16])
    o_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, D // 2, 16])
    c_l: gl.constexpr = _copy_layout(D, num_warps)
    n_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, num_warps], [1, 0])
    sh_l: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BH, D], sh_l)
    kv_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BN, D], sh_l)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BH, BN], sh_l)

    # one flat grid, the head blocks of a token adjacent (they share its KV rows through L2)
    n_hb = gl.cdiv(H, BH)
    pid = gl.program_id(0)
    t = (pid // n_hb).to(gl.int64)
    h0 = (pid % n_hb) * BH
    idx_row = idx_ptr + t * idx_st
    dc = gl.arange(0, D, layout=gl.SliceLayout(0, c_l))

    # group 0: the query's heads and block 0's rows
    qh = h0 + gl.arange(0, BH, layout=gl.SliceLayout(1, c_l))
    cp.async_copy_global_to_shared(q_smem, q_ptr + t * q_st + qh[:, None] * q_sh + dc[None, :], mask=(qh < H)[:, None])
    r_l: gl.constexpr = gl.SliceLayout(1, c_l)
    _copy_rows(kv_smem.index(0), _ids(idx_row, 0, K, BN, r_l), dc, s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3)
    cp.commit_group()

    one = gl.arange(0, 1, layout=gl.SliceLayout(1, n_l))
    nblk = gl.max(n_blocks(idx_row + one, one < 1, K, BN, gl.arange(0, 512, layout=gl.SliceLayout(0, n_l))), axis=0)
    # group 1: block 1's rows
    if 1 < nblk:
        ids1 = _ids(idx_row, 1, K, BN, r_l)
        _copy_rows(kv_smem.index(1), ids1, dc, s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3)
    cp.commit_group()
    nxt = _ids(idx_row, 2, K, BN, r_l)  # block b + 2's ids, read before block b + 1's copies wait on them
    m = gl.full([BH], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_l))
    den = gl.zeros([BH], gl.float32, layout=gl.SliceLayout(1, s_l))
    acc = gl.zeros([BH, D], gl.float32, layout=o_l)
    s_init = gl.zeros([BH, BN], gl.float32, layout=s_l)
    r = _ids(idx_row, 0, K, BN, gl.SliceLayout(0, s_l))  # block 0's ids for the score mask, in the scores' layout
    cp.wait_group(1)  # q and block 0
    fence_async_shared()
    gl.thread_barrier()
    s = warpgroup_mma(q_smem, kv_smem.index(0).permute((1, 0)), s_init, use_acc=False)  # block 0's scores
    for b in range(0, nblk):
        kv = kv_smem.index(b % 2)
        s = gl.where((r >= 0)[None, :], s, float("-inf")) * scale
        m_new = gl.maximum(m, gl.max(s, axis=1))
        alpha = expf_cuda(m - m_new)
        p = expf_cuda(s - m_new[:, None])
        den = gl.fma(den, alpha, gl.sum(p, axis=1))
        m = m_new
        p_smem.store(p.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()  # both warpgroups' halves of P, before either's P V
        pv = warpgroup_mma(p_smem, kv, acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_l))[:, None], is_async=True)
        if b + 1 < nblk:
            # block b + 1's scores go to the tensor cores behind this block's P V (they read q and the other
            # buffer); this block's buffer is refilled once every warp is past its P V
            r = _ids(idx_row, b + 1, K, BN, gl.SliceLayout(0, s_l))  # its ids for the score mask
            cp.wait_group(0)  # block b + 1's group
            fence_async_shared()
            gl.thread_barrier()
            sc = warpgroup_mma(q_smem, kv_smem.index((b + 1) % 2).permute((1, 0)), s_init, use_acc=False,
                               is_async=True)  # fmt: skip
            acc = warpgroup_mma_wait(1, deps=[pv])
            gl.thread_barrier()  # P and this block's rows are free
            if b + 2 < nblk:
                _copy_rows(kv, nxt, dc, s0, s1, s2, s3, c1, c2, c3, c4, st0, st1, st2, st3)
            cp.commit_group()
            nxt = _ids(idx_row, b + 3, K, BN, r_l)
            s = warpgroup_mma_wait(0, deps=[sc])
        else:
            acc = warpgroup_mma_wait(0, deps=[pv])
    cp.wait_group(0)  # an empty list ran no block: its (masked) copies still complete before the program ends
    heads = h0 + gl.arange(0, BH, layout=gl.SliceLayout(1, s_l))
    den = den + expf_cuda(gl.load(sink_ptr + heads, mask=heads < H, other=0.0) - m)
    o = gl.div_rn(acc, gl.convert_layout(den, gl.SliceLayout(1, o_l))[:, None])
    ho = h0 + gl.arange(0, BH, layout=gl.SliceLayout(1, o_l))
    do = gl.arange(0, D, layout=gl.SliceLayout(0, o_l))
    gl.store(o_ptr + t * H * D + ho[:, None] * D + do[None, :], o.to(gl.bfloat16), mask=(ho < H)[:, None])


def on_sm90(device: torch.device) -> bool:
    """Whether `device` is a GPU this kernel compiles for (wgmma: sm_90 only; not the later architectures)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def fits(q: torch.Tensor, srcs: list[torch.Tensor]) -> bool:
    """Whether this kernel runs the call: an sm_90 GPU, d one of `DIMS`, and every row 16-byte aligned (one cp.async
    a thread per 8 values; q [T, h, d] and each source [R, d] with d contiguous)."""
    d = q.shape[2]
    if not on_sm90(q.device) or d not in DIMS:
        return False
    tensors = [q, *srcs]
    strides = [q.stride(0), q.stride(1), *(s.stride(0) for s in srcs)]
    return all(x.data_ptr() % 16 == 0 for x in tensors) and all(st % 8 == 0 for st in strides)


def launch(q, out, idx, sink, srcs, bounds, softmax_scale):
    """Run the kernel over every (token, 64-head block); arguments as the Triton kernel's (`sparse_attn`)."""
    t, h, d = q.shape
    grid = (t * runtime.cdiv(h, HEADS),)
    _sparse_attn_wgmma_kernel[grid](
        q, out, idx, sink, *srcs, *bounds, *(s.stride(0) for s in srcs),
        h, idx.shape[1], q.stride(0), q.stride(1), idx.stride(0), softmax_scale,
        D=d, BH=HEADS, BN=BLOCK_N, num_warps=WARPS,
    )  # fmt: skip

"""Pieces shared by the GEMM-side Triton kernels (fp8_gemm, fp4_gemm, dense_linear, moe_experts, o_lora, moe_gate):
the exact act_quant recipe as a tile function, the ordered reduction of split-K partials (in the GEMM launch itself
or as a second launch), the K-only chunking, autotuning with short timing runs, NaN-poisonable output buffers for
the tests, launch helpers, and the FP4 block GEMM's loop trip (`fp4_trip`, fp4_gemm's and moe_experts'). (Hot
loops call few nested jit helpers, one per trip or block at most: the CPU interpreter pays milliseconds per call.)

Layout convention of every kernel here ("swap AB"): the weight rows (output features) are the MMA's M side in
tiles of 64 or 128, the tokens are its N side in tiles of 16 to 256. wgmma needs M >= 64, its N may be as small
as 8, so the same instruction family serves a one-token decode and a 4096-token prefill: a token's bits do not
depend on how many tokens share its tile (batch invariance), and a decode tile does not waste 63 of 64 MMA rows.

K-chunked accumulation (what makes split-K batch-invariant): the official kernels accumulate the scaled per-block
partial products P_k * s_k into one fp32 accumulator in ascending k (spec §3.4/§3.5). Here the K blocks are cut
into at most `MAX_CHUNKS` chunks of `chunk_blocks(n)` consecutive blocks, a function of K alone; each chunk is
accumulated from zero in ascending k, and the chunk sums are added in ascending order. A program that owns the
whole K does exactly that in registers; a split-K launch (small M, too few tiles for the GPU) writes each chunk's
sum to a float32 workspace, and the sums are added in the same order: by the last program to finish each output
tile, in the same launch (fp8_gemm, fp4_gemm: `store_tile` and `tile_counters`), or by a second launch
(dense_linear: `reduce_chunks`). All give the same bits, so the split decision (a function of M) never changes a
token's result. When K has at most `MAX_CHUNKS` blocks every chunk is one block and the order is exactly the
official one; otherwise the fp32 additions are grouped differently (an fp32-rounding-level difference, far below
the bf16 output step).
"""

import contextlib

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _quant, runtime

MAX_CHUNKS = 8


# tests set this: every buffer a kernel must fill completely starts as NaN, so an element it skips fails the test
POISON = False


def empty(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty`, NaN-filled (0xFF bytes for fp8 and integer buffers) while `POISON` is set."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        if t.is_floating_point() and t.element_size() > 1:
            t.fill_(float("nan"))
        else:
            t.view(torch.uint8).fill_(0xFF)  # e4m3 0xFF is NaN
    return t


def chunk_blocks(n_blocks: int) -> int:
    """K blocks per accumulation chunk: a function of K only (see the module docstring)."""
    return max(1, -(-n_blocks // MAX_CHUNKS))


def n_chunks(n_blocks: int) -> int:
    return -(-n_blocks // chunk_blocks(n_blocks))


def scale_arg(s: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A scale tensor as a kernel argument: e8m0 travels as its uint8 bytes (Triton has no e8m0 type; decoded in the
    kernel), fp32 as is. Returns (tensor, is_e8m0)."""
    if s.dtype == torch.float8_e8m0fnu:
        return s.view(torch.uint8), True
    if s.dtype != torch.float32:
        raise ValueError(f"scales must be float8_e8m0fnu or float32, got {s.dtype}")
    return s, False


def on_device(t: torch.Tensor):
    """Launch context for kernels on `t`'s device: Triton launches on torch's current CUDA device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _quick_bench(kernel_call, quantiles):
    # autotuning picks among a handful of configs: short timing runs keep first calls (and the benchmark) fast.
    # Replayed from a CUDA graph: a decode-sized kernel runs for less time than Python takes to launch it, so eager
    # timing ranks the configs by launch overhead (measured on the H200: 7-25 us kernels timed at 70-250 us)
    if torch.cuda.is_available() and not torch.cuda.is_current_stream_capturing():
        try:
            return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)
        except RuntimeError:  # a kernel call that cannot be captured: time it eagerly
            pass
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# Launch option of every kernel that accumulates scaled block products (C += P * s): no fused multiply-add. The
# official kernels round P * s and the sum separately, and ptxas contracts `acc += p * s` into an FMA in some tile
# configurations and not in others, so with non-power-of-two (fp32) scales a row's bits would depend on which
# configuration its batch size selected (measured on the H200: fp8_gemm rows of a 37-token batch changed inside a
# 100-token one). With power-of-two (ue8m0) scales P * s is exact and the option changes nothing.
NO_FMA = {"enable_fp_fusion": False}


def autotune(configs, key, prune=None):
    """`triton.autotune` with short timing runs (one config when interpreting: nothing is timed there); `prune(configs,
    named_args, **kwargs)` drops the configs a launch's constexprs rule out (triton's `early_config_prune`)."""
    by = None if prune is None else {"early_config_prune": prune}
    return triton.autotune(configs=configs, key=key, do_bench=_quick_bench, prune_configs_by=by)


def bucket(m: int) -> int:
    """Autotune key for the token count: powers of two up to 4096 (one config per size class, not per M)."""
    return min(4096, runtime.next_pow2(max(1, m)))


def pairs_order(q: torch.Tensor) -> torch.Tensor:
    """Quantized activations `[rows, K]` (K a multiple of 32) copied in the pairs order the FP4 tiles read: within
    each 32-wide run the even elements first, then the odd ones (position h * 16 + b holds element 2b + h). A packed
    FP4 weight byte b holds elements 2b and 2b + 1 in its low and high nibble (spec §2.2), so a run's 16 bytes
    decode to its low-nibble and high-nibble halves in this order with no byte shuffles (moe_experts'
    `_mm_fp4`, fp4_gemm)."""
    rows, k = q.shape
    b = q.view(torch.uint8)  # one byte per element whatever the float8 type (torch has few float8 kernels)
    return b.view(rows, k // 32, 16, 2).transpose(-1, -2).contiguous().view(rows, k).view(q.dtype)


# ---- tile functions ---------------------------------------------------------------------------------------------


@triton.jit
def pow2_ceil(v):
    """2^ceil(log2 v) for positive normal fp32 v from the IEEE bits (the official fast_log2_ceil + fast_pow2);
    returns (2^e, 2^-e), both exact (act_quant's exponent pieces: |e| <= 126 for v >= fl32(1e-4) / 448)."""
    e = _quant.pow2_ceil_exp(v)
    return _quant.exp2i(e), _quant.exp2i(-e)


@triton.jit
def e8m0_to_f32(e):
    """ue8m0 scale bytes (any integer type) -> fp32 2^(e - 127), exact: e = 0 gives the subnormal 2^-127, e = 255
    NaN (the e8m0 NaN code), as torch's float8_e8m0fnu -> float32."""
    e = e.to(tl.int32)
    return tl.where(e == 0, 0x00400000, tl.where(e == 255, 0x7FC00000, e << 23)).to(tl.float32, bitcast=True)


@triton.jit
def pow2_reciprocal(s):
    """1 / s for fp32 powers of two s = 2^e with -126 < e < 127 (act_quant's scales lie in 2^-22 .. 2^120): 2^-e
    from the exponent bits, biased 254 - E, exact (an IEEE division compiles to a branchy subroutine)."""
    return ((254 << 23) - s.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def quant_e4m3(x, AXIS: tl.constexpr):
    """act_quant of one 128-group per row (spec §3.2), the group along `AXIS` of the fp32 tile x: amax clamped to
    fl32(1e-4), s = pow2_ceil(amax * fl32(1/448)), y = e4m3_rne(clamp(x / s, +-448)). x / s is exact (s is a power of
    two), so multiplying by 2^-e gives the same bits. Returns (y float8e4nv, s fp32 reduced along AXIS)."""
    amax = tl.maximum(tl.max(tl.abs(x), axis=AXIS), 1e-4)
    s, inv = pow2_ceil(amax * (1.0 / 448.0))
    y = x * tl.expand_dims(inv, AXIS)
    y = tl.clamp(y, -448.0, 448.0)
    return y.to(tl.float8e4nv), s


# ---- ordered reduction of split-K chunk partials as a second launch (dense_linear; fp8/fp4_gemm above 16 tokens) --


@triton.jit(do_not_specialize=["numel"])
def _reduce_chunks_kernel(ws_ptr, c_ptr, numel, N_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    # out = bf16(((0 + ws[0]) + ws[1]) + ...): the same fp32 additions, in the same order, as one program that
    # accumulates the chunks in registers from zero (also the sign of a zero sum: 0 + -0 is +0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(0, N_CHUNKS):
        total += tl.load(ws_ptr + c * numel + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, total.to(c_ptr.dtype.element_ty), mask=mask)


def reduce_chunks(ws: torch.Tensor, out: torch.Tensor) -> None:
    """ws: fp32 [n_chunks, *out.shape] chunk sums -> out (contiguous; bf16 rounded to nearest even, or fp32),
    0 + ws[0] + ws[1] + ... in ascending chunk order."""
    numel = out.numel()
    block = 4096 if runtime.interpreting() else 1024
    _reduce_chunks_kernel[(runtime.cdiv(numel, block),)](ws, out, numel, N_CHUNKS=ws.shape[0], BLOCK=block)


# ---- split-K reduced in the same launch: the last program of an output tile adds the chunk sums -----------------
#
# A split-K launch of fp8_gemm / fp4_gemm has a grid (weight tiles, token tiles, chunks). Each program stores its
# chunk sum to the workspace, then adds 1 (acq_rel, GPU scope) to its output tile's int32 arrival counter; the
# program that reads n_chunks - 1 arrived last, so every other chunk sum of the tile is visible to it: it adds them
# in chunk order (the additions of `_reduce_chunks_kernel`, bit for bit) and puts the counter back to 0
# (`last_arrival_sum`, also under moe_experts' split launches).
# This saves the second launch (measured on the H200: fp4_gemm Flash w1 at one token, a 5.3 us reduction launch
# after a 10.2 us GEMM).
#
# The counters: one zero-filled int32 buffer per device, shared by every split launch of these ops. Invariant: all
# counters are 0 between launches (each launch's last programs restore the zeros they found), so neither a call
# nor a CUDA-graph replay, which keeps the buffer's address, has to clear them. The buffer is allocated by a
# device's first split launch (normally the eager warm-up before a capture; allocated inside a capture, its zero fill
# is captured too and repeated by each replay, which is harmless) and only grows, to a power of two; an outgrown
# buffer stays allocated, because a captured graph may still count into it. Consequences: split launches on one
# device must be ordered on one stream (two running at once on two streams would count into the same counters); a
# launch that starts but does not finish leaves counters non-zero and every later split launch wrong. On the GPU
# that is a device fault, after which the CUDA context is unusable anyway; in the interpreter an exception in the
# middle of the grid: the wrappers call `reset_tile_counters` when a launch raises.

_COUNTERS: dict[torch.device, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []  # kept alive: CUDA graphs captured with them may still replay


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The arrival counters of `device` (all zero between launches), at least `tiles` of them."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(1024, runtime.next_pow2(tiles)), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def reset_tile_counters(device: torch.device) -> None:
    """Restore the all-zero invariant after a launch that did not run to completion."""
    if device in _COUNTERS:
        _COUNTERS[device].zero_()


def smallest_tile(*tuners) -> tuple[int, int]:
    """(BLOCK_W, BLOCK_T) the smallest of any configuration of these autotuners: a split launch's output tiles (one
    arrival counter each) are at most cdiv(N, BLOCK_W) * cdiv(M, BLOCK_T) of them."""
    configs = [c.kwargs for tuner in tuners for c in tuner.configs]
    return min(c["BLOCK_W"] for c in configs), min(c["BLOCK_T"] for c in configs)


def split_buffers(split: bool, chunks: int, m: int, n: int, out: torch.Tensor, smallest: tuple[int, int]):
    """(fp32 workspace [chunks, m, n], arrival counters for the output tiles of the `smallest` tile) of a split-K
    launch writing `out`; `out` twice (unused arguments) when K is not split."""
    if not split:
        return out, out
    tiles = runtime.cdiv(n, smallest[0]) * runtime.cdiv(m, smallest[1])
    return empty(chunks, m, n, dtype=torch.float32, device=out.device), tile_counters(out.device, tiles)


@contextlib.contextmanager
def split_reduction(ws: torch.Tensor, out: torch.Tensor, split: bool, in_launch: bool):
    """Around a split-capable launch: a launch that raises part way (the interpreter) may leave arrival counters
    non-zero, so they are reset; a split launch that does not reduce in the launch gets `reduce_chunks` after it."""
    try:
        yield
    except BaseException:
        if in_launch:
            reset_tile_counters(out.device)
        raise
    if split and not in_launch:
        reduce_chunks(ws, out)


# Split launches of at most this many tokens reduce in the launch; larger ones keep the second launch. H200, graph
# times (docs/perf.md, session 5): in-launch was faster at one token everywhere (fp8_gemm Flash wq_a 6.71 -> 5.52
# us, wo_b 13.31 -> 12.16; fp4_gemm Flash w1 10.35 -> 8.73) and at 64 tokens even or slower (Flash wo_b's 128 x 64
# tiles 17.6 -> 29.2 us: the tile's last program reads eight 32 KiB partials alone)
IN_LAUNCH_MAX_M = 16


def reduce_in_launch(m: int) -> bool:
    return m <= IN_LAUNCH_MAX_M


@triton.jit
def last_arrival_sum(acc, ws_ptrs, chunk_numel, cnt_ptr, mask):
    """A split-K program's chunk sum `acc` of its output tile (grid axes 0, 1: the tile; axis 2: the chunk): stored
    to its chunk's workspace slice (`ws_ptrs`: the tile's elements in chunk 0, `chunk_numel` apart), its arrival
    counted on the tile's counter. The last program of the tile to arrive gets (True, 0 + ws[0] + ws[1] + ... in
    chunk order: the additions of a program that loops over the chunks from zero), the others (False, acc); the
    counter is put back to 0."""
    tl.store(ws_ptrs + tl.program_id(2) * chunk_numel, acc, mask=mask)
    # every thread's stores before the one thread's release of the counter (the CUTLASS semaphore pattern)
    tl.debug_barrier()
    n_split = tl.num_programs(2)
    cnt = cnt_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    last = tl.atomic_add(cnt, 1, sem="acq_rel") == n_split - 1
    if last:
        acc = tl.zeros(acc.shape, dtype=tl.float32)
        for c in range(0, n_split):  # the other programs' sums, read from L2 (.cg: not a stale L1 line)
            acc += tl.load(ws_ptrs + c * chunk_numel, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(cnt, 0)  # every program of the tile has counted: no other access follows in this launch
    return last, acc


@triton.jit
def store_tile(
    total, c_ptr, ws_ptr, cnt_ptr, offs_w, offs_t, mask, M, N, stride_cm, SPLIT: tl.constexpr,
    IN_LAUNCH: tl.constexpr,
):  # fmt: skip
    """Store a program's [BLOCK_W, BLOCK_T] fp32 K sum `total` of the output tile (rows offs_w, tokens offs_t):
    as bf16 to c when the program owns the whole K; in a split-K launch (grid axis 2: the chunks) to its chunk's
    fp32 workspace slice ws[chunk, t, n], and with IN_LAUNCH the last program of the tile to arrive stores
    0 + ws[0] + ws[1] + ... (`last_arrival_sum`) into c (without, `reduce_chunks` does after the launch)."""
    c_ptrs = c_ptr + offs_t[None, :] * stride_cm + offs_w[:, None]
    if SPLIT:
        ws_ptrs = ws_ptr + offs_t[None, :] * N + offs_w[:, None]
        if IN_LAUNCH:
            last, total = last_arrival_sum(total, ws_ptrs, M.to(tl.int64) * N, cnt_ptr, mask)
            if last:
                tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ws_ptrs + tl.program_id(2) * M.to(tl.int64) * N, total, mask=mask)
    else:
        tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=mask)


# The decoding of `fp4_to_e4m3_words` as PTX on 32-bit words: $2 holds four packed bytes, $0 gets the low nibbles'
# e4m3 bytes and $1 the high nibbles'. A constexpr so that compiled kernels can read it; the CPU cannot run PTX, so
# tests/optimized/ops/test_fp4_decode_ptx.py executes this very text (its integer ops) against the uint8 expressions
# the interpreter runs and against the e2m1 values.
FP4_WORDS_PTX = tl.constexpr("""{
        .reg .b32 t0, t1;
        shl.b32 t0, $2, 2;
        and.b32 t0, t0, 0x1C1C1C1C;
        shl.b32 t1, $2, 4;
        and.b32 t1, t1, 0x80808080;
        or.b32 $0, t0, t1;
        shr.b32 t0, $2, 2;
        and.b32 t0, t0, 0x1C1C1C1C;
        and.b32 t1, $2, 0x80808080;
        or.b32 $1, t0, t1;
        }""")


@triton.jit
def fp4_to_e4m3_words(packed):
    """Packed e2m1 pairs [..] uint8 -> (low nibbles, high nibbles) as e4m3 bytes holding fp4 * 2^-6: the nibble
    s.e1e0.m moved to bits 7 and 4..2 (exact for every code, the subnormal 0.5 included; the kernels fold the 2^6
    into the power-of-two weight scale). The same bit moves as the kernels' uint8 expressions (which the CPU
    interpreter runs: it has no PTX), done on four bytes per 32-bit register op (`FP4_WORDS_PTX`): Triton's uint8
    arithmetic compiled for sm_90 spent ~12 instructions per packed byte on byte extraction and repacking (SASS of
    the FP4 MoE gate-up loop: 1054 instructions per 128-K step, 630 with this)."""
    return tl.inline_asm_elementwise(
        asm=FP4_WORDS_PTX,
        constraints="=r,=r,r",
        args=[packed],
        dtype=(tl.uint8, tl.uint8),
        is_pure=True,
        pack=4,
    )


@triton.jit
def fp4_block_product(packed, a, DOT_F64: tl.constexpr):
    """P of one 32-wide K block, from zero: packed e2m1 weights [R, 16] uint8 decoded to e4m3 (fp4 * 2^-6, exact;
    the caller's weight scale carries the 2^6) times e4m3 activations [32, T] in the pairs order (`pairs_order`):
    the block's low-nibble half, then its high-nibble half, side by side with no byte shuffles. fp32 [R, T].
    DOT_F64 (the interpreter, which runs no PTX): the same bit moves as uint8 expressions, and an exact block
    product (a float64 dot, BLAS-fast)."""
    if DOT_F64:
        lo = ((packed << 2) & 0x1C) | ((packed << 4) & 0x80)
        hi = ((packed >> 2) & 0x1C) | (packed & 0x80)
    else:
        lo, hi = fp4_to_e4m3_words(packed)
    w = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (packed.shape[0], 32)).to(tl.float8e4nv, bitcast=True)
    if DOT_F64:
        return tl.dot(w.to(tl.float64), a.to(tl.float64), input_precision="ieee").to(tl.float32)
    return tl.dot(w, a)


@triton.jit
def fp4_trip(acc, w_ptrs, x_ptrs, mask_w, mask_x, s_w, s_act, W_E8M0: tl.constexpr, N_BLOCKS: tl.constexpr,
             POW2: tl.constexpr, DOT_F64: tl.constexpr, X_NATURAL: tl.constexpr):  # fmt: skip
    """One loop trip of the FP4 block GEMM (fp4_gemm's loop and moe_experts' `_mm_fp4`): N_BLOCKS 32-wide K blocks
    that share one activation 128-group, each P from zero (`fp4_block_product`), acc += (P * sa) * sw in ascending
    K (spec §3.5). Returns the new acc, fp32 [R, T].

    w_ptrs [R, 16]: the packed bytes of the trip's first block (a block's 32 weights are 16 contiguous bytes of the
    row, element 2b in the low nibble of byte b, spec §2.2); x_ptrs [32, T]: its first e4m3 activations, K-major,
    in the pairs order, or in K order when X_NATURAL (each block then permuted to the pairs order in registers: a
    shared-memory round trip, which fp4_gemm's decode launches pay instead of a torch copy); s_w [R, N_BLOCKS]:
    the blocks' weight scales as loaded (e8m0 bytes when W_E8M0, else fp32); s_act [1, T]: the activation scale of
    the group.

    The decoding's 2^-6 (`fp4_to_e4m3_words`) goes into the weight scale (times 2^6, exact), which leaves every
    product and rounding of (P * sa) * sw unchanged. POW2 (every weight and activation scale a power of two: e8m0
    weights, ue8m0 act_quant) scales in fewer ops with the same bits: multiplying by a power of two is exact and
    commutes with rounding, so with B = C / sa, C + (P * sa) * sw = sa * (B + P * sw), and B + P * sw is one fma
    (its product is exact); per accumulator element and 128-group 2 multiplies and 4 fmas instead of 8 multiplies
    and 4 adds. The same bits while no intermediate leaves fp32's normal range (a scaled accumulator or product
    below 2^-126 or above 2^128, which real activations and weights do not reach); the tests compare both forms bit
    for bit.

    Compiled for sm_90 (moe_experts' FP4 gate-up loop, 64-feature slices of 16 tokens, 4 warps): 698 -> 437
    instructions per trip with the pairs order and POW2 (PRMT 148 -> 0, shared-memory loads 43 -> 11, fp32
    multiplies and adds 200 -> 100). Holding the four products before scaling any saved no MMA wait (each
    register-operand MMA is waited for before its registers are reused) and cost 70 registers at 32-token tiles."""
    if W_E8M0:
        s_w = e8m0_to_f32(s_w)
    s_w = s_w * 64.0  # the 2^6 of the decoding (exact)
    cols = tl.arange(0, N_BLOCKS)[None, :]
    if POW2:
        acc = acc * pow2_reciprocal(s_act)  # B = C / sa
    for j in tl.static_range(N_BLOCKS):
        xq = tl.load(x_ptrs + 32 * j, mask=mask_x, other=0.0)
        if X_NATURAL:  # K order -> the pairs order in registers: [32, T] -> [16, 2, T] -> [2, 16, T] -> [32, T]
            xq = tl.reshape(tl.permute(tl.reshape(xq, (16, 2, xq.shape[1])), (1, 0, 2)), (32, xq.shape[1]))
        packed = tl.load(w_ptrs + 16 * j, mask=mask_w, other=0)  # [R, 16] uint8
        p = fp4_block_product(packed, xq, DOT_F64)
        sw = tl.sum(tl.where(cols == j, s_w, 0.0), axis=1)[:, None]  # column j, exactly (the rest adds zeros)
        if POW2:
            acc = tl.fma(p, sw, acc)
        else:
            acc += (p * s_act) * sw
    if POW2:
        acc = acc * s_act
    return acc

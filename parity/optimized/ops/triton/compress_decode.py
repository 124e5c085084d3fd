"""Triton `compress_decode`: a compressor's whole decode step in one launch: one program per request writes its
token into the compressor state and, when the token completes a block, pools the block, normalizes, rotates and
fake-quantizes the new entry and writes it to the request's paged pool row. The unfused path launches three kernels
and a paged write per compressor and step (`compress_state`, `compress_pool`, `compress_finish`, an indexed copy).

Reference: parity.reference.model.Compressor.decode_block, then the pooling and the tail of Compressor.forward, per
request; the op's torch form (`ops/compress_decode.py`) runs the three ops' torch forms and the write.

Per program (request i; the stages are the `@triton.jit` helpers of the three kernels, the same arithmetic):
1. the token's kv and score + ape into its state row (`token_into_state`, as `compress_state`);
2. if the token completes a block (output row m = the completing requests before it, `done_before`): the block read
   back column chunk by column chunk (`block_tile`, as `compress_state`), pooled in float64 and rounded once to fp32
   (`softmax_pool`, as `compress_pool`) into a workspace row; after a barrier the overlap's shift (`shift_state`)
   and the workspace row read back whole;
3. `finish_rows` (compress_finish's norm, RoPE and fake-quant), stored to the entries output and to pool row
   `pool_rows[m]`.
The state is bit for bit the twin's (copies and its one addition). The pooled values equal `compress_pool`'s
wherever a float64 sum of the block's terms in this tile's order rounds to the same fp32 as in that kernel's tile:
the same values in the interpreter (tested bit for bit against the three kernels in sequence); on a GPU a different
reduction order could move one only when its float64 result lies within ~2^-29 relative of an fp32 rounding
boundary. Unverified without a GPU: the speed, and that equality on CUDA (the CUDA tests assert it).
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime
from parity.optimized.ops.triton.compress_finish import finish_rows
from parity.optimized.ops.triton.compress_pool import softmax_pool
from parity.optimized.ops.triton.compress_state import block_tile, done_before, shift_state, token_into_state


@triton.jit
def _decode_kernel(
    kv_ptr, sc_ptr, ape_ptr, rows_ptr, phase_ptr, slot_ptr, skv_ptr, ssc_ptr,
    ws_ptr, out_ptr, pool_ptr, prow_ptr, w_ptr, f_ptr, pos_ptr,
    eps, h_scale, stride_kv, stride_sc, stride_f, stride_pool,
    RATIO: tl.constexpr, HD: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr, OVERLAP: tl.constexpr,
    HAS_ROWS: tl.constexpr, EMIT: tl.constexpr, NP: tl.constexpr, WR: tl.constexpr, BC: tl.constexpr,
    PC: tl.constexpr, RD: tl.constexpr, ROTATE: tl.constexpr, LOG_D: tl.constexpr, ROUND_SCALE: tl.constexpr,
    FP8: tl.constexpr, FUSED: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    # PLANT (tests only): 1 = the overlap shift skipped, 2 = the entry written to pool row m, 3 = RoPE on the first
    # rd dims
    i = tl.program_id(0)
    p, base, src, new_row = token_into_state(
        kv_ptr, sc_ptr, ape_ptr, rows_ptr, phase_ptr, slot_ptr, skv_ptr, ssc_ptr, i, stride_kv, stride_sc,
        RATIO, ROWS, CD, OVERLAP, HAS_ROWS, BC, 0,
    )  # fmt: skip
    if EMIT:
        if p == RATIO - 1:
            m = done_before(phase_ptr, i, RATIO, NP)
            r = tl.arange(0, WR)
            for c0 in range(0, HD, PC):  # the block's columns
                c = c0 + tl.arange(0, PC)
                tkv, tsc, _ = block_tile(
                    kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv, stride_sc, c,
                    c < HD, r, RATIO, HD, CD, ROWS, OVERLAP, WR,
                )  # fmt: skip
                pooled = softmax_pool(tkv.to(tl.float64), tsc.to(tl.float64), 0)  # [PC]
                tl.store(ws_ptr + m * HD + c, pooled.to(tl.float32), mask=c < HD)
            tl.debug_barrier()  # the block's reads of rows 0..r-1 before the shift; the pooled row before its reads
            if OVERLAP:
                if PLANT != 1:
                    shift_state(kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv,
                                stride_sc, RATIO, CD, BC)  # fmt: skip
            row = m + tl.arange(0, 1).to(tl.int64)  # [1]
            cols = tl.arange(0, HD)[None, :]
            x = tl.load(ws_ptr + row[:, None] * HD + cols)
            y = finish_rows(x, row, row >= 0, w_ptr, f_ptr, pos_ptr, HD, eps, h_scale, stride_f,
                            HD, RD, 1, ROTATE, LOG_D, ROUND_SCALE, FP8, FUSED, 1 if PLANT == 3 else 0)  # fmt: skip
            entry = y.to(tl.bfloat16)
            tl.store(out_ptr + row[:, None] * HD + cols, entry)
            if PLANT == 2:
                dest = row
            else:
                dest = tl.load(prow_ptr + row).to(tl.int64)
            tl.store(pool_ptr + dest[:, None] * stride_pool + cols, entry)


def compress_decode(
    kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap,
    weight, eps, freqs_cis, positions, rotate, scale_fmt, scale_dtype, fp8, pool, pool_rows,
):  # fmt: skip
    """The `CompressDecode` contract (see `ops/compress_decode.py`)."""
    return launch(
        kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap,
        weight, eps, freqs_cis, positions, rotate, scale_fmt, fp8, pool, pool_rows,
    )  # fmt: skip


def launch(
    kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap,
    weight, eps, freqs_cis, positions, rotate, scale_fmt, fp8, pool, pool_rows, plant: int = 0,
):  # fmt: skip
    """The kernel behind `compress_decode`; `plant` (tests only): 1 skips the overlap shift, 2 writes entry m to
    pool row m, 3 rotates the first rd dims."""
    n = phase.shape[0]
    ratio, cd = ape.shape
    coff = 2 if overlap else 1
    hd, rows_n = cd // coff, coff * ratio
    rd = 2 * freqs_cis.shape[-1]
    assert state_kv.is_contiguous() and state_score.is_contiguous(), "compress_decode: state must be contiguous"
    assert state_kv.shape[1:] == (rows_n, cd) == state_score.shape[1:], (tuple(state_kv.shape), ratio, cd)
    assert kv.stride(-1) == 1 and score.stride(-1) == 1 and kv.shape[-1] == cd == score.shape[-1]
    assert hd & (hd - 1) == 0 and hd >= 64 and (hd - rd) % 64 == 0, f"compress_decode: head dim {hd}, rope {rd}"
    assert pool.dim() == 2 and pool.shape[1] == hd and pool.stride(1) == 1, tuple(pool.shape)
    m = 0 if done_slots is None else done_slots.shape[0]
    out = torch.empty(m, hd, dtype=torch.bfloat16, device=kv.device)
    ws = torch.empty(m, hd, dtype=torch.float32, device=kv.device)  # the pooled rows, between the two stages
    if n:
        f = torch.view_as_real(freqs_cis)  # [S, rd/2, 2] fp32
        if f.stride(-2) != 2 or f.stride(-1) != 1:
            f = f.contiguous()
        wr = runtime.next_pow2(rows_n)
        interp = runtime.interpreting()
        bc = min(runtime.next_pow2(cd), max(16, (1 << 16 if interp else 4096) // wr))
        pc = min(runtime.next_pow2(hd), max(16, (1 << 16 if interp else 1024) // wr))
        _decode_kernel[(n,)](
            kv, score, ape.contiguous(), phase if rows is None else rows, phase, slots, state_kv, state_score,
            ws, out, pool, pool_rows if m else phase, weight.contiguous(), f, positions if m else phase,
            float(eps), hd**-0.5, kv.stride(0), score.stride(0), f.stride(0), pool.stride(0),
            RATIO=ratio, HD=hd, CD=cd, ROWS=rows_n, OVERLAP=bool(overlap), HAS_ROWS=rows is not None,
            EMIT=done_slots is not None, NP=runtime.next_pow2(n), WR=wr, BC=bc, PC=pc, RD=rd,
            ROTATE=bool(rotate), LOG_D=hd.bit_length() - 1, ROUND_SCALE=scale_fmt is not None, FP8=bool(fp8),
            FUSED=kv.device.type == "cuda", PLANT=plant, num_warps=4, enable_fp_fusion=False,
        )  # fmt: skip
    return None if done_slots is None else out

"""Triton `compress_state`: one program per request writes its decode token into the compressor state and, when the
token completes a block, emits the block and shifts the state, in one launch for the whole step.

Reference: parity.reference.model.Compressor.decode_block (per request); the torch op (`ops/compress_state.py`) does
the same for all requests with ~10 launches at a step that completes blocks (the ape gather and addition, the state
writes, the gathers, the overlap concatenations, the shift writes), which the decode step's host pays per
compressor and layer.

Per program (request i, state slot s, phase p = position % r):
1. the token's kv and score + ape[p] (one fp32 addition, as the twin) into state row p (r + p with the ratio-4
   overlap), column chunk by column chunk;
2. if p == r - 1 (the token completes a block): its output row m = the completing requests before it (request
   order, as `done_slots`); the block read back column by column of it (overlap: rows < r from state columns
   [0, d), rows >= r from [d, 2d)) with the new row taken from registers (another thread may not have stored it
   yet) and written out, then, after a barrier (every read done), rows r..2r-1 copied to rows 0..r-1 (overlap).
The stages are `@triton.jit` helpers that `compress_decode`'s kernel shares.
Each request owns its slot's rows, so programs never touch each other's state. Only copies and the twin's addition:
bit for bit the twin on every device.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime


@triton.jit
def token_row(kv_ptr, sc_ptr, ape_ptr, src, p, stride_kv, stride_sc, c, cm, CD: tl.constexpr):
    """Columns `c` of the token's state row: its kv, and its score + ape[p] (the twin's one fp32 addition)."""
    kvn = tl.load(kv_ptr + src * stride_kv + c, mask=cm)
    scn = tl.load(sc_ptr + src * stride_sc + c, mask=cm) + tl.load(ape_ptr + p * CD + c, mask=cm)
    return kvn, scn


@triton.jit
def token_into_state(kv_ptr, sc_ptr, ape_ptr, rows_ptr, phase_ptr, slot_ptr, skv_ptr, ssc_ptr, i, stride_kv, stride_sc,
                     RATIO: tl.constexpr, ROWS: tl.constexpr, CD: tl.constexpr, OVERLAP: tl.constexpr,
                     HAS_ROWS: tl.constexpr, BC: tl.constexpr, PLANT: tl.constexpr):  # fmt: skip
    """Request i's token (kv, and score + ape) into its state row (r + p with the overlap), column chunk by column
    chunk -> its phase p, its slot's first state element, its token's row and the state row. PLANT 2 (tests only):
    the overlap's new row at p."""
    p = tl.load(phase_ptr + i).to(tl.int64)
    base = tl.load(slot_ptr + i).to(tl.int64) * (ROWS * CD)
    if HAS_ROWS:
        src = tl.load(rows_ptr + i).to(tl.int64)
    else:
        src = i.to(tl.int64)
    new_row = p
    if OVERLAP:
        if PLANT != 2:
            new_row = p + RATIO
    for c0 in range(0, CD, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < CD
        kvn, scn = token_row(kv_ptr, sc_ptr, ape_ptr, src, p, stride_kv, stride_sc, c, cm, CD)
        tl.store(skv_ptr + base + new_row * CD + c, kvn, mask=cm)
        tl.store(ssc_ptr + base + new_row * CD + c, scn, mask=cm)
    return p, base, src, new_row


@triton.jit
def state_tile(skv_ptr, ssc_ptr, base, r, col, mask, new_row, kvn, scn, CD: tl.constexpr):
    """Rows `r` x state columns `col` of one slot's state (kv, score), the token's row (`new_row`) taken from
    registers (another thread may not have stored it yet); masked elements read as kv 0, score -inf."""
    offs = base + r[:, None] * CD + col
    is_new = (r == new_row)[:, None]
    tkv = tl.where(is_new, kvn[None, :], tl.load(skv_ptr + offs, mask=mask, other=0.0))
    tsc = tl.where(is_new, scn[None, :], tl.load(ssc_ptr + offs, mask=mask, other=float("-inf")))
    return tkv, tsc


@triton.jit
def block_tile(kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv, stride_sc, c, cm, r,
               RATIO: tl.constexpr, HD: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr, OVERLAP: tl.constexpr,
               WR: tl.constexpr):  # fmt: skip
    """Columns `c` (mask `cm`) of the block request's token completes, rows `r` [WR] -> (kv, score, mask) `[WR,
    len(c)]`: rows < r from state columns c and rows >= r from c + d with the overlap (the token's row is in the
    upper half, its values at c + d), the token's row from registers."""
    if OVERLAP:
        col = c[None, :] + tl.where((r >= RATIO)[:, None], HD, 0)
        newc = c + HD
    else:
        col = c[None, :] + tl.zeros([WR, 1], dtype=tl.int64)
        newc = c
    kvn, scn = token_row(kv_ptr, sc_ptr, ape_ptr, src, p, stride_kv, stride_sc, newc, cm, CD)
    mask = (r < ROWS)[:, None] & cm[None, :]
    tkv, tsc = state_tile(skv_ptr, ssc_ptr, base, r, col, mask, new_row, kvn, scn, CD)
    return tkv, tsc, mask


@triton.jit
def done_before(phase_ptr, i, RATIO: tl.constexpr, NP: tl.constexpr):
    """The output row of request i's block: the requests before it whose tokens complete a block."""
    j = tl.arange(0, NP)
    return tl.sum((tl.load(phase_ptr + j, mask=j < i, other=-1) == RATIO - 1).to(tl.int64))


@triton.jit
def shift_state(kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv, stride_sc,
                RATIO: tl.constexpr, CD: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """The overlap's shift after a completed block: state rows r..2r-1 copied to rows 0..r-1 (the completed block
    becomes the previous one), the token's row taken from registers (another thread may not have stored it yet).
    The caller's reads of rows 0..r-1 must be done (a barrier before)."""
    r = tl.arange(0, RATIO)
    for c0 in range(0, CD, BC):
        c = c0 + tl.arange(0, BC)
        cm = c < CD
        kvn, scn = token_row(kv_ptr, sc_ptr, ape_ptr, src, p, stride_kv, stride_sc, c, cm, CD)
        tkv, tsc = state_tile(skv_ptr, ssc_ptr, base, r + RATIO, c[None, :], cm[None, :], new_row, kvn, scn, CD)
        dst = base + r[:, None] * CD + c[None, :]
        tl.store(skv_ptr + dst, tkv, mask=cm[None, :])
        tl.store(ssc_ptr + dst, tsc, mask=cm[None, :])


@triton.jit
def _state_kernel(
    kv_ptr, sc_ptr, ape_ptr, rows_ptr, phase_ptr, slot_ptr, skv_ptr, ssc_ptr, bkv_ptr, bsc_ptr, N,
    stride_kv, stride_sc,
    RATIO: tl.constexpr, HD: tl.constexpr, CD: tl.constexpr, ROWS: tl.constexpr, OVERLAP: tl.constexpr,
    HAS_ROWS: tl.constexpr, EMIT: tl.constexpr, NP: tl.constexpr, WR: tl.constexpr, BC: tl.constexpr,
    PLANT: tl.constexpr,
):  # fmt: skip
    # PLANT (tests only): 1 = the overlap shift skipped, 2 = the overlap's new row written at p instead of r + p
    i = tl.program_id(0)
    p, base, src, new_row = token_into_state(
        kv_ptr, sc_ptr, ape_ptr, rows_ptr, phase_ptr, slot_ptr, skv_ptr, ssc_ptr, i, stride_kv, stride_sc,
        RATIO, ROWS, CD, OVERLAP, HAS_ROWS, BC, PLANT,
    )  # fmt: skip
    if EMIT:
        if p == RATIO - 1:
            m = done_before(phase_ptr, i, RATIO, NP)
            r = tl.arange(0, WR)
            for c0 in range(0, HD, BC):  # the block's columns
                c = c0 + tl.arange(0, BC)
                tkv, tsc, mask = block_tile(
                    kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv, stride_sc, c,
                    c < HD, r, RATIO, HD, CD, ROWS, OVERLAP, WR,
                )  # fmt: skip
                boffs = m * (ROWS * HD) + r[:, None] * HD + c[None, :]
                tl.store(bkv_ptr + boffs, tkv, mask=mask)
                tl.store(bsc_ptr + boffs, tsc, mask=mask)
            if OVERLAP:
                if PLANT != 1:
                    tl.debug_barrier()  # every read of rows 0..r-1 above before the shift overwrites them
                    shift_state(kv_ptr, sc_ptr, ape_ptr, skv_ptr, ssc_ptr, src, p, base, new_row, stride_kv,
                                stride_sc, RATIO, CD, BC)  # fmt: skip


def compress_state(kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap):
    """The `CompressState` contract (see `ops/compress_state.py`)."""
    return launch(kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap)


def launch(kv, score, ape, rows, phase, slots, done_slots, state_kv, state_score, overlap, plant: int = 0):
    """The kernel behind `compress_state`; `plant` (tests only): 1 skips the overlap shift, 2 writes the overlap's
    new row at p instead of r + p."""
    n = phase.shape[0]
    ratio, cd = ape.shape
    coff = 2 if overlap else 1
    hd, rows_n = cd // coff, coff * ratio
    assert state_kv.is_contiguous() and state_score.is_contiguous(), "compress_state: state must be contiguous"
    assert state_kv.shape[1:] == (rows_n, cd) == state_score.shape[1:], (tuple(state_kv.shape), ratio, cd)
    assert kv.stride(-1) == 1 and score.stride(-1) == 1 and kv.shape[-1] == cd == score.shape[-1]
    m = 0 if done_slots is None else done_slots.shape[0]
    blocks = [torch.empty(m, rows_n, hd, dtype=torch.float32, device=kv.device) for _ in range(2)]
    if n:
        wr = runtime.next_pow2(rows_n)
        budget = 1 << 16 if runtime.interpreting() else 4096
        bc = min(runtime.next_pow2(cd), max(16, budget // wr))
        _state_kernel[(n,)](
            kv, score, ape.contiguous(), phase if rows is None else rows, phase, slots, state_kv, state_score,
            *blocks, n, kv.stride(0), score.stride(0),
            RATIO=ratio, HD=hd, CD=cd, ROWS=rows_n, OVERLAP=bool(overlap), HAS_ROWS=rows is not None,
            EMIT=done_slots is not None, NP=runtime.next_pow2(n), WR=wr, BC=bc, PLANT=plant,
        )  # fmt: skip
    return None if done_slots is None else tuple(blocks)

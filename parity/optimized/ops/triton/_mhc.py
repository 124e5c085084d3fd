"""Pieces shared by the mHC kernels `hc_pre` and `hc_head` (private to those two modules).

Both kernels start with the same per-token mixer GEMV over the flattened streams, `x_flat [4D] . fn[n] [4D]`, plus
the sum of squares that gives the token's rsqrt (spec §4.3 steps 1-3, §4.6 step 1), and both end with the
pre-weighted collapse `y = sum_j pre[j] * x[j]` (spec §4.3 step 5). What lives here:

- `mix_partial`: one K range of the GEMV for a block of tokens, over BK-wide chunks. The twin's F.linear is fp32
  with TF32 off (spec §12.1); here each chunk's dot runs on the tensor cores from fp32 fn cut into three bf16 pieces
  (`split3`: hi + mid + lo == fn exactly) against the bf16 streams, so every product is exact (8 x 8 significant
  bits), and the three piece dots accumulate in one fp32 accumulator (smallest piece first); each chunk's result is
  added in float64. The squares are taken and summed in float64 (exact: a bf16 square has 16 significant bits). A
  token's numbers depend only on the fixed chunking (BK), never on the batch around it nor on how the chunks are
  grouped into K pieces (KSPLIT): the tensor core sums each output element from its own row and column, k16 steps
  in k order whatever the tile (measured on the H100: the same bits from 16-row mma.sync tiles and 64-row wgmma
  tiles, `bench/triton_mhc.py`'s sweep), and the float64 sums of the chunks' fp32 results and of the squares are
  exact for all practical inputs (a sum of fp32 terms is exact in float64 unless they span more than ~2^29 in
  magnitude). Accuracy: a chunk's error is the tensor core's fp32 accumulation (its adder truncates) over 64 exact
  products; on the H100 (session 28, 64-4096 tokens of V4-Flash / Pro shapes) the worst mix error against the float64
  mixes was 0.2-0.7x the former fp32 FMA dot's and 0.03-0.12x the twin's, and hc_pre / hc_head use at most 8 % of
  their allowance in `bench/triton_mhc.py`'s checks, as the FMA dot did. Speed (H100, 4096 tokens, Flash, the mixes
  alone): 0.201 ms at hc_pre's 16-row tile (0.060 with 64-row tiles) against 0.644 for the FMA dot, which had been
  ~90 % of hc_pre. (The CPU interpreter's `tl.dot` is numpy's BLAS matmul, whose rounding depends on a row's
  position in the tile, so there the chunk dot is fp32 products summed per element: ROWWISE.)
- The K split: a token block's K range is cut into SPLITS fixed pieces, one program each, so decode-sized batches
  still spread the 24 x 4D fp32 mixer matrix over many SMs. Each program writes its float64 partials, and the last
  of the SPLITS programs to arrive (an acq_rel atomic counter; nobody waits) sums them in split order and finishes
  the block (only its first BTF rows when the launch has no more tokens than that: `finisher`). The split is the
  fastest grid dimension, so a block's pieces run side by side and its finishing program re-reads the block's
  streams from L2. The counters live in a per-device buffer that every finishing
  program resets to zero, so a launch needs no memset (the kernels assume one stream at a time, as the engine).
  hc_pre's decode launches go one step further: the finisher publishes the block's pre and the split programs wait
  for it and share the collapse (`hc_pre._collapse_share`; its flags follow the arrival counters in that buffer).
- `exp_f32` / `sigmoid_f32`: exp evaluated in float64 and rounded once to fp32, which is how the twin
  (`parity.reference.kernels._exp`) evaluates it; CUDA's `expf` (the official TileLang kernel) is within 2 ulp.
- `collapse`: y = ((0 + p0 x0) + p1 x1) + ... in fp32 with every product rounded, then bf16: torch's sum over the
  stream dim of the materialized products (sequential over 4 values on CPU and CUDA alike). The kernels launch
  with `enable_fp_fusion=False` so the compiler cannot contract a product into the next add.
"""

from contextlib import contextmanager

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import runtime

# tl.reduce with triton's own combine functions is what tl.sum / tl.max do, minus their @jit wrapper: the CPU
# interpreter re-patches triton.language on every nested @jit call (~5 ms), and the Sinkhorn loop reduces 40 times
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


@triton.jit
def exp_f32(x):
    """exp of fp32 `x`, evaluated in float64 and rounded once to fp32."""
    return tl.exp(x.to(tl.float64)).to(tl.float32)


@triton.jit
def sigmoid_f32(x):
    """1 / (1 + exp(-x)) in fp32 ops with IEEE division (TVM's legalization of T.sigmoid, spec §4.5)."""
    return tl.div_rn(1.0, 1.0 + exp_f32(-x))


@triton.jit
def fn_rows(n, NP: tl.constexpr, MIX: tl.constexpr, N_COMB: tl.constexpr):
    """(fn row, valid) of mix columns n in [0, NP). Without N_COMB column n computes fn row n. With N_COMB (hc_pre:
    HC * HC comb rows after the 2 * HC pre and post rows) comb takes columns [0, N_COMB) and pre and post columns
    [NP / 2, NP / 2 + MIX - N_COMB), so each half of the columns reshapes to [R / 2, HC] rows and the Sinkhorn takes
    one half alone. A column's dot does not depend on its position in the tile: the layout only moves numbers."""
    if N_COMB > 0:
        pp = MIX - N_COMB
        half = NP // 2
        row = tl.where(n < N_COMB, n + pp, n - half)
        return row, (n < N_COMB) | ((n >= half) & (n < half + pp))
    return n, n < MIX


@triton.jit
def split3(w):
    """fp32 `w` as three bf16 pieces, hi + mid + lo == w exactly: hi is w rounded to bf16, mid the rest rounded,
    lo what is left (24 significant bits = three times bf16's 8; each difference is exact in fp32). Holds while lo
    stays a normal bf16, |w| >= ~2^-110 (a V4 mixer weight is ~1e-2)."""
    hi = w.to(tl.bfloat16)
    rest = w - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def mix_partial(
    x_ptr, fn_ptr, rows, rmask, stride_t, K, k_lo, k_hi,
    NP: tl.constexpr, MIX: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, ROWWISE: tl.constexpr,
    N_COMB: tl.constexpr = 0, PLANT: tl.constexpr = 0,
):  # fmt: skip
    """Partial mixes over k in [k_lo, k_hi) of the tokens `rows`: (float64 [BT, NP] dot, float64 [BT] sum x^2),
    column n the mix of fn row `fn_rows(n, NP, MIX, N_COMB)`. x rows are the flattened bf16 streams (stride_t
    apart, unit stride inside); fn is [MIX, K] fp32, row-major. Each BK chunk's dot on the tensor cores from fn's
    three bf16 pieces (`split3`), smallest first, in one fp32 accumulator. ROWWISE (the CPU interpreter): the chunk
    dot as fp32 products summed per output element, because the interpreter's `tl.dot` is numpy's BLAS matmul,
    whose rounding depends on a row's position in the tile."""
    n = tl.arange(0, NP)
    fr, fvalid = fn_rows(n, NP, MIX, N_COMB)
    acc = tl.zeros([BT, NP], dtype=tl.float64)
    sq = tl.zeros([BT, BK], dtype=tl.float64)
    for k0 in range(k_lo, k_hi, BK):
        k = k0 + tl.arange(0, BK)
        kmask = k < k_hi
        xt = tl.load(x_ptr + rows[:, None] * stride_t + k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        tl.static_assert(xt.dtype == tl.bfloat16, "hc mixers: the streams must be bf16 (exact tensor-core operands)")
        w = tl.load(fn_ptr + fr[None, :] * K + k[:, None], mask=fvalid[None, :] & kmask[:, None], other=0.0)
        if ROWWISE:
            part = tl.reduce(xt.to(tl.float32)[:, None, :] * tl.trans(w)[None, :, :], 2, SUM)
        else:
            w_hi, w_mid, w_lo = split3(w)
            if PLANT == 5:  # planted bug: fn rounded to bf16 (one piece), what a plain bf16 tensor-core GEMM does
                w_mid = tl.zeros_like(w_mid)
                w_lo = tl.zeros_like(w_lo)
            part = tl.dot(xt, w_lo)
            part = tl.dot(xt, w_mid, part)
            part = tl.dot(xt, w_hi, part)
        acc += part.to(tl.float64)
        x64 = xt.to(tl.float64)
        sq += x64 * x64
    return acc, tl.reduce(sq, 1, SUM)


@triton.jit
def store_partial(ws_ptr, acc, sq, split, T, rows, rmask, NP: tl.constexpr, MIX: tl.constexpr):
    """Write one split's partials to the float64 workspace [SPLITS, T, MIX + 1] (column MIX: sum of squares)."""
    n = tl.arange(0, NP)
    row_base = ws_ptr + (split * T + rows) * (MIX + 1)
    tl.store(row_base[:, None] + n[None, :], acc, mask=rmask[:, None] & (n < MIX)[None, :])
    tl.store(row_base + MIX, sq, mask=rmask)


@triton.jit
def gather_partials(
    ws_ptr, T, rows, rmask, NP: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr, BT: tl.constexpr
):
    """Sum every split's partials in split order (the same order whichever program arrives last). `.cg` loads
    read L2, never a stale L1 line."""
    n = tl.arange(0, NP)
    acc = tl.zeros([BT, NP], dtype=tl.float64)
    sq = tl.zeros([BT], dtype=tl.float64)
    if BT <= 16:
        for split in tl.static_range(SPLITS):  # unrolled: every split's loads in flight at once, in split order
            row_base = ws_ptr + (split * T + rows) * (MIX + 1)
            mask = rmask[:, None] & (n < MIX)[None, :]
            acc += tl.load(row_base[:, None] + n[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            sq += tl.load(row_base + MIX, mask=rmask, other=0.0, cache_modifier=".cg")
    else:  # a loop, in the same order: unrolled, larger tiles' [BT, NP] float64 loads of every split spill
        for split in range(SPLITS):
            row_base = ws_ptr + (split * T + rows) * (MIX + 1)
            mask = rmask[:, None] & (n < MIX)[None, :]
            acc += tl.load(row_base[:, None] + n[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            sq += tl.load(row_base + MIX, mask=rmask, other=0.0, cache_modifier=".cg")
    return acc, sq


@triton.jit
def finish_partials(
    ws_ptr, tb, T, NP: tl.constexpr, MIX: tl.constexpr, SPLITS: tl.constexpr, BT: tl.constexpr, BTF: tl.constexpr
):
    """What the finishing program of token block `tb` works on: the block's first BTF rows (int64), their mask and
    their summed partials (`gather_partials`). BTF < BT only when the whole launch has at most BTF tokens
    (`config`), so those are all of its rows."""
    rows = tb * BT + tl.arange(0, BTF)
    mask = rows < T
    rows = rows.to(tl.int64)
    acc, sq = gather_partials(ws_ptr, T, rows, mask, NP, MIX, SPLITS, BTF)
    return rows, mask, acc, sq


@triton.jit
def collapse(
    x_ptr, y_ptr, pre, rows, rmask, stride_t, D, d_lo, d_hi, HC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr
):
    """y[t, d] = sum_j pre[t, j] * x[t, j, d] in fp32 (products rounded, j in order), stored as y's dtype, for the
    columns d_lo <= d < min(d_hi, D); pre [BT, HC]. y is [T, D] contiguous; x rows are [HC, D] contiguous, stride_t
    apart."""
    j_idx = tl.arange(0, HC)[None, :]
    d_end = tl.minimum(d_hi, D)
    for d0 in range(d_lo, d_end, BD):
        d = d0 + tl.arange(0, BD)
        mask = rmask[:, None] & (d < d_end)[None, :]
        y = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(HC):
            pj = tl.reduce(tl.where(j_idx == j, pre, 0.0), 1, SUM)  # one nonzero term: exact
            xj = tl.load(x_ptr + rows[:, None] * stride_t + j * D + d[None, :], mask=mask, other=0.0)
            y = y + pj[:, None] * xj.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * D + d[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ---- host side -------------------------------------------------------------------------------------------------

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` int32 arrival counters on `device`, all zero (every kernel leaves them zero)."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


# block-size overrides for tuning runs (bench/triton_mhc.py sweeps them): BT, BD, BTF, num_warps and KSPLIT (elements
# per K piece, a multiple of BK) only regroup tokens, columns and chunk sums into programs, so they never change a
# bit (KSPLIT: the float64 sums of `mix_partial` are exact). BK rounds the fp32 chunk dots: not overridable
TUNING: dict = {}
_REGROUP = ("BT", "BD", "BTF", "num_warps", "KSPLIT", "APART", "SHARE", "TAIL", "BDT")
# ROWWISE False in the interpreter runs the GPU's tensor-core chunk dot there (tests of its numbers; the
# interpreter's `tl.dot` then rounds by a row's place in the tile, so not batch-invariant)
_NUMERICS = ("ROWWISE",)
# hc_pre's collapse as a launch of its own (APART): tokens x columns per program. The finishing program of a token
# block otherwise streams the block's 16 x 4 x D streams alone, after the Sinkhorn (H200, 64 tokens, session 10's
# sweep: the finish costs ~3-4 us per row of a block); `config` says where it is used
COLLAPSE_TILE = (4, 512)


@contextmanager
def tuned(**overrides):
    """`TUNING` set to `overrides` for the block (tests, the bench's sweep), left empty after it, however it ends."""
    TUNING.update(overrides)
    try:
        yield
    finally:
        TUNING.clear()


def config(n_tokens: int, dim: int, op: str = "hc_head", hc: int = 4) -> dict:
    """Block sizes of `op` (hc_pre or hc_head). The numerics depend only on BK (fixed per platform); BT, BD, BTF,
    BDF, KSPLIT and the warps only change how tokens, columns and K chunks are grouped into programs and threads.
    Interpreted: few, big programs (the interpreter pays ~0.5 ms per tensor op of every program); the tiny model's
    4 x 256 streams then take one K piece, a 512-wide model two."""
    if runtime.interpreting():
        bt = min(max(runtime.next_pow2(n_tokens), 16), 256)
        cfg = dict(BT=bt, BK=128, KSPLIT=1024, BD=min(runtime.next_pow2(dim), 1024), num_warps=4, ROWWISE=True)
        cfg["APART"] = False
    else:
        # 16 tokens: the smallest mma tile (hc_head takes 32 at prefill sizes, below). K pieces: a decode launch has
        # few token blocks, so smaller pieces put more programs on the SMs (H200, one token, Flash: hc_pre 0.054 /
        # 0.037 / 0.028 ms with 1024 / 512 / 256-element pieces, hc_head 0.028 / 0.019 / 0.015;
        # docs/perf-h200/session10.md). Past 128 tokens the blocks alone fill the SMs
        ksplit = 256 if n_tokens <= 16 else 512 if n_tokens <= 128 else 1024
        cfg = dict(BT=16, BK=64, KSPLIT=ksplit, BD=256, num_warps=4, ROWWISE=False)
        # the collapse apart (`COLLAPSE_TILE`) is faster on the H200 from 4 tokens (session 11, hc_pre graph us,
        # finisher's collapse / apart: 1 token 23.2 / 24.2, 4 tokens 27.8 / 24.6, 16 tokens 64.4 / 48.3, 64 tokens
        # 70.2 / 55.5) but is a second launch, and issue 10 asks for hc_pre in one launch; eagerly that launch would
        # also cost the host more (~50-100 us) than it saves. Off; `TUNING["APART"]` turns it on
        cfg["APART"] = False
    # hc_pre's collapse shared by the split programs (`hc_pre._collapse_share`) where its launch allows (`launch`).
    # Never in the interpreter: it runs the programs one after another, and a waiting program would wait forever
    cfg["SHARE"] = not runtime.interpreting()
    # hc_pre's collapse by programs queued after the mix programs (`hc_pre._hc_pre_kernel`, TAIL), BDT columns each,
    # where SHARE cannot be (prefill); its waits only ever wait on programs that started earlier, so the interpreter,
    # which runs programs in turn, runs it too (tests turn it on there). On the GPU from 256 tokens: `prefill_tiles`
    cfg["TAIL"] = False
    cfg["BDT"] = 512
    if op == "hc_pre" and not runtime.interpreting():
        # warps per program (H100, session 14, graph us at 1 / 4 / 16 / 64 tokens, Flash, 2 / 4 / 8 warps: 14.8 /
        # 18.6 / 23.2, 16.8 / 19.4 / 20.3, 37.2 / 27.5 / 22.5, 30.8 / 35.3 / 30.4; Pro 1 token 15.9 / 21.1 / 28.8): two
        # for a few tokens (the K pieces' GEMV is short and the finish one row), eight while the collapse is shared
        # (16 rows of the Sinkhorn over twice the threads), two again past 128 tokens (76.5 against 104.4 at 256,
        # before TAIL). hc_head keeps four: within 1 us of the best or better at every size measured but 16 tokens
        # (8 warps 24.6 / 28.5). From 256 tokens `prefill_tiles` sets the tiles and warps
        cfg["num_warps"] = 2 if n_tokens <= 4 else 8 if n_tokens <= 128 else 2
        if n_tokens >= 256:
            cfg.update(prefill_tiles(n_tokens, hc * dim))
    elif op == "hc_head" and not runtime.interpreting():
        # hc_head with the tensor-core mixer GEMM (session 28, H100, graph ms, Flash): 64 tokens 8 warps 0.0227
        # against 0.0324 with 4; 4096 tokens 32-row blocks, 128 columns, 2 warps 0.189 against 0.235 at 256 and 4
        if 16 <= n_tokens <= 128:
            cfg["num_warps"] = 8
        elif n_tokens > 256:
            cfg.update(BT=32, BD=128, num_warps=2)
    cfg.update({k: v for k, v in TUNING.items() if k in _REGROUP + _NUMERICS})
    if cfg["SHARE"] and runtime.interpreting():
        raise ValueError("hc mixers: SHARE needs programs that run at once; the interpreter runs them in turn")
    return finisher(cfg, n_tokens, dim)


# hc_pre's prefill launch below 4096 tokens wants at least this many mix programs (1.5 waves of the H100 / H200's
# 132 SMs): the larger K pieces that give it, else smaller, else 16-row blocks (`prefill_tiles`)
PREFILL_MIX_PROGRAMS = 192


def prefill_tiles(n_tokens: int, k: int) -> dict:
    """hc_pre's tiles from 256 tokens on the GPU (K = hc x dim elements a row): the collapse by BDT-column programs
    queued after the mix programs (TAIL), 4 warps, 64-row blocks of 128 columns: K pieces of 4096 elements from 4096
    tokens, below that of 2048 or else 1024 where they give `PREFILL_MIX_PROGRAMS` mix programs, else 16-row blocks
    of 256 columns in 1024-element pieces.

    H100 (session 30), graph ms, the old default (16-row blocks without TAIL; 64 rows from 4096 tokens) -> this, the
    same bits at every size: Flash 256 0.049 -> 0.037 (16 rows), 512 0.057 -> 0.045 (16 rows), 768 0.081 -> 0.053,
    1024 0.091 -> 0.052 (K 1024; K 2048's 128 programs: 0.108), 2048 0.149 -> 0.080 (K 2048), 4096 0.204 -> 0.148,
    8192 0.354 -> 0.280, 16384 0.609 -> 0.561; Pro 256 0.070 -> 0.040 (16 rows), 512 0.099 -> 0.056 (K 1024), 1024
    0.149 -> 0.079 (K 2048; K 1024 0.090), 2048 0.239 -> 0.131 (K 2048; K 4096 0.144), 4096 0.349 -> 0.241, 8192
    0.589 -> 0.489, 16384 1.020 -> 0.972. No count of programs alone picks the pieces: Pro 1024's 224 programs of
    K 2048 beat its 448 of K 1024, Pro 2048's 224 of K 4096 lost to its 448 of K 2048. TAIL frees the 64-row mixes
    from one finishing program per block collapsing all its columns alone (2 MB for Flash); collapsing each block a
    few blocks behind its mixes, while its streams might still be in L2, was slower at every lag timed (4 and 12
    blocks; Flash 4096: 0.18-0.38)."""
    tail = dict(TAIL=True, BT=64, BD=128, BDT=256, num_warps=4)
    if n_tokens >= 4096:
        return dict(tail, KSPLIT=4096)
    for ksplit in (2048, 1024):
        if runtime.cdiv(n_tokens, 64) * runtime.cdiv(k, ksplit) >= PREFILL_MIX_PROGRAMS:
            return dict(tail, KSPLIT=ksplit)
    return dict(tail, BT=16, BD=256, KSPLIT=1024)


def finisher(cfg: dict, n_tokens: int, dim: int) -> dict:
    """The split path's finishing tile (`BTF` rows, `BDF` columns of the collapse): a launch of fewer tokens than
    BT (decode) finishes only the next power of two of them, its collapse columns widened to keep the tile's size.
    Why: the finish (mixes from the partials, the Sinkhorn's 40 fp32 divisions and float64 sums, the collapse) runs
    for every row of its tile, valid or not; on the H200 (docs/perf-h200/triton_mhc.md, block sweep at T 64) hc_pre
    took 95 / 147 / 280 us with 16 / 32 / 64-row blocks, ~4 us more per row, and a one-token call 73 us with a 16-row
    tile (session 10's sweep: 0.078 ms with the 16-row finish, 0.054 with the narrow one). Rows are independent, so
    the tile never changes a bit. Without a split (SPLITS 1: the mixes stay in the GEMV's registers) the finish
    keeps the block's BT x BD."""
    bt = cfg["BT"]
    btf = cfg.get("BTF") or min(bt, runtime.next_pow2(n_tokens))
    if btf < bt and n_tokens > btf:
        raise ValueError(f"hc mixers: a finisher of {btf} rows cannot finish blocks of {bt} ({n_tokens} tokens)")
    return dict(cfg, BTF=btf, BDF=min(runtime.next_pow2(dim), max(cfg["BD"], cfg["BD"] * bt // btf)))


def workspace(splits: int, n_tokens: int, mix: int, device) -> torch.Tensor:
    """float64 partials [SPLITS, T, MIX + 1] (unused when SPLITS == 1: a 1-element placeholder)."""
    if splits == 1:
        return torch.empty(1, dtype=torch.float64, device=device)
    return torch.empty(splits * n_tokens * (mix + 1), dtype=torch.float64, device=device)

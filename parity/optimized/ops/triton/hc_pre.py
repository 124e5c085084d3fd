"""Triton hc_pre: the mHC pre-mix of every token in ONE launch (spec §4.3 with the Sinkhorn split of §4.5).

Reference: parity.reference.model.hc_pre (mixes, rsqrt, pre-weighted sum) and parity.reference.kernels.
hc_split_sinkhorn (the official TileLang kernel's twin).

Per block of tokens (grid: SPLITS K pieces x token blocks, `_mhc` says how the pieces meet):
1. mixes = (x_flat . fn^T) * rsqrt(mean(x_flat^2) + norm_eps): BK-chunk dots on the tensor cores from fn's three
   exact bf16 pieces (`_mhc.mix_partial`) summed in float64, the sum of squares in float64, the rsqrt and the
   product in float64, rounded once to fp32. The twin rounds the GEMM (in BLAS order), the mean, the rsqrt and the
   product each to fp32; here only the 64-element chunk dots round (fp32 accumulation), measured closer to the
   float64 mixes than the twin's (`_mhc`).
2. Sinkhorn split of the 24 mixes (the dot's 32 columns hold comb's 4 x 4 first, then pre, post and padding:
   `_mhc.fn_rows`), pre and post from one [BT, 4, 4] half, the Sinkhorn on the comb half alone, in the twin's fp32
   op order: `m*scale + base` as an fma (float64 product and sum rounded once), sigmoid =
   1/(1+exp(-x)) with IEEE division (`tl.div_rn`; Triton's `/` on fp32 is the approximate div.full), exp evaluated
   in float64 and rounded to fp32 (the twin's `_exp`), softmax over k, `+ eps`, the column normalization, then
   (iters - 1) row/column pairs; every row and column sum of 4 is summed in float64 and rounded once, as the twin's.
3. y = sum_j pre[j] * x[j] (fp32 products, j in order) -> bf16. Where the launch's programs all fit on the SMs at
   once (decode: up to 128 tokens of V4-Flash), the finishing program publishes the block's pre before its Sinkhorn
   and every split program collapses its own D / SPLITS columns (`_collapse_share`, SHARE); otherwise the finishing
   program collapses all columns (or, as an option, a second launch over tokens x columns: `_collapse_kernel`,
   APART in `_mhc.config`); from 256 tokens (`_mhc.prefill_tiles`) collapse programs of BDT columns are queued
   after every mix program in one 1-D grid (TAIL), numbered by tickets taken on arrival so that each waits only on
   a finisher that has already started. The same products and sums per element every way, so the same bits. H100,
   graph us, Flash, 16 / 64 tokens: 43.3 / 48.9 with the finisher's collapse, 27.5 / 35.3 shared (4 warps each).

Tolerance (tests: `tests/optimized/ops/test_hc_pre.py`, float64 goldens; the registry entry states it): the GEMM
cannot follow the twin's BLAS summation order, so the mixes differ from the twin's in the last fp32 bits and the
Sinkhorn's 40 fp32 divisions carry that into post/comb, in proportion to the logit scale. Measured on the tiny
model: the twin itself is up to ~25 fp32 ulp from the float64 math on comb (~180 with a comb scale of 8) and ~14
on post; exactly rounded mixes would still leave ~13 / ~3 ulp. The kernel uses at most ~35% of its allowance.

Speed: the mixer GEMM was an fp32 FMA dot (32 FMAs per streamed element) until session 28, ~90 % of the op at
prefill sizes (H100, Flash, 4096 tokens: 0.72 ms, 7.7 % of HBM); on the tensor cores (`_mhc.mix_partial`) the op
took 0.26 ms there (21.7 % of HBM), 0.20 of it still the mixes at the 16-row tile; from 4096 tokens 64-row tiles
(a quarter of the fn reloads) take 0.205 ms (26.5 %; session 29), where one finishing program per 64-token block
still collapsed its 2 MB of streams alone; with the collapse queued behind the mix programs (TAIL) 0.149 ms
(session 30; `_mhc.prefill_tiles` has every size timed). The block-size sweep of `bench/triton_mhc.py` picks the
default tile among bit-identical configurations.

Unverified without a GPU: that `tl.exp` on float64 lowers to libdevice's correctly rounded `__nv_exp` (it does in
Triton 3.6's NVIDIA backend source), the L2 visibility of the split partials to the finishing program (acq_rel
counter + `.cg` loads), the bit-identity across block sizes on the GPU (the bench checks it), and the speed.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _mhc, runtime
from parity.optimized.ops.triton._mhc import MAX as _MAX
from parity.optimized.ops.triton._mhc import SUM as _SUM


@triton.jit
def _finish(
    acc, sq, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr, flag_ptr, rows, rmask, stride_t, D, K,
    norm_eps, hc_eps, iters, d_lo, d_hi, HC: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    APART: tl.constexpr, PUBLISH: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    RH: tl.constexpr = R // 2
    if PLANT == 2:  # planted bug: the streams were normalized before the projection (acc already holds x*r)
        mix = acc.to(tl.float32)
    else:
        r = 1.0 / tl.sqrt(sq / K + norm_eps)  # float64: IEEE sqrt and division
        mix = (acc * r[:, None]).to(tl.float32)
    # the columns (`_mhc.fn_rows` with N_COMB = HC * HC): comb in the first half, pre and post in the second, each
    # half RH x HC rows, so the Sinkhorn works on comb alone (it ran on all R rows: twice the divisions)
    m_comb, m_pp = tl.split(tl.permute(tl.reshape(mix, [BT, 2, RH * HC]), (0, 2, 1)))
    row = tl.arange(0, RH)[None, :, None]
    col = tl.arange(0, HC)[None, None, :]
    m_pp = tl.reshape(m_pp, [BT, RH, HC])  # row 0 pre, row 1 post
    idx = row * HC + col
    scale = tl.load(scale_ptr + tl.minimum(row, 1))
    base = tl.load(base_ptr + idx, mask=row < 2, other=0.0)
    a = (m_pp.to(tl.float64) * scale.to(tl.float64) + base.to(tl.float64)).to(tl.float32)  # fma, rounded once
    sig = _mhc.sigmoid_f32(a)
    pre = tl.reduce(tl.where(row == 0, sig, 0.0), 1, _SUM) + hc_eps  # [BT, HC]; one nonzero term: exact
    post = 2.0 * tl.reduce(tl.where(row == 1, sig, 0.0), 1, _SUM)
    hc_i = tl.arange(0, HC)[None, :]
    if PUBLISH:  # pre before the Sinkhorn: the block's waiting programs (SHARE, TAIL) collapse their columns
        tl.store(pre_ptr + rows[:, None] * HC + hc_i, pre, mask=rmask[:, None])
        tl.debug_barrier()  # every thread's stores precede the release
        tl.atomic_xchg(flag_ptr, 1, sem="release")

    is_comb = row < HC  # all RH rows but for HC = 1
    m_comb = tl.reshape(m_comb, [BT, RH, HC])
    scale_c = tl.load(scale_ptr + 2)
    base_c = tl.load(base_ptr + 2 * HC + idx, mask=is_comb, other=0.0)
    a = (m_comb.to(tl.float64) * scale_c.to(tl.float64) + base_c.to(tl.float64)).to(tl.float32)
    c = tl.where(is_comb, a, 0.0)
    c = _mhc.exp_f32(c - tl.reduce(c, 2, _MAX, keep_dims=True))
    c = tl.div_rn(c, tl.reduce(c.to(tl.float64), 2, _SUM, keep_dims=True).to(tl.float32)) + hc_eps
    # from here rows that are not comb rows (HC = 1 only) hold zeros, which stay zero (0 / (0 + eps)) and add
    # nothing to the column sums; every row and column sum of HC is taken in float64 and rounded once, as the twin's
    c = tl.where(is_comb, c, 0.0)
    c = tl.div_rn(c, tl.reduce(c.to(tl.float64), 1, _SUM, keep_dims=True).to(tl.float32) + hc_eps)
    for _ in range(1, iters):
        c = tl.div_rn(c, tl.reduce(c.to(tl.float64), 2, _SUM, keep_dims=True).to(tl.float32) + hc_eps)
        c = tl.div_rn(c, tl.reduce(c.to(tl.float64), 1, _SUM, keep_dims=True).to(tl.float32) + hc_eps)

    rows3 = rows[:, None, None]
    tl.store(post_ptr + rows[:, None] * HC + hc_i, post, mask=rmask[:, None])
    if PLANT == 1:  # planted bug: comb written as [k, j]
        comb_off = col * HC + row
    else:
        comb_off = row * HC + col
    tl.store(comb_ptr + rows3 * (HC * HC) + comb_off, c, mask=rmask[:, None, None] & is_comb)
    if APART:  # the collapse is `_collapse_kernel`'s, launched next
        tl.store(pre_ptr + rows[:, None] * HC + hc_i, pre, mask=rmask[:, None])
    else:  # columns [d_lo, d_hi): all of them, with SHARE this program's share, with TAIL none
        _mhc.collapse(x_ptr, y_ptr, pre, rows, rmask, stride_t, D, d_lo, d_hi, HC, BT, BD)


@triton.jit
def _collapse_kernel(x_ptr, pre_ptr, y_ptr, T, D, HC: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """The collapse of `_finish` (APART) as its own launch, a program per BT tokens x BD columns: the same products
    and sums per element, so the same bits; spread over the SMs instead of one finishing program per token block."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    rmask = rows < T
    rows = rows.to(tl.int64)
    pre = tl.load(pre_ptr + rows[:, None] * HC + tl.arange(0, HC)[None, :], mask=rmask[:, None], other=0.0)
    d_lo = tl.program_id(1) * BD
    _mhc.collapse(x_ptr, y_ptr, pre, rows, rmask, HC * D, D, d_lo, d_lo + BD, HC, BT, BD)


@triton.jit
def _collapse_share(
    x_ptr, pre_ptr, y_ptr, flag_ptr, done_ptr, tb, T, D, d_lo, d_hi, WAITERS: tl.constexpr, HC: tl.constexpr,
    BT: tl.constexpr, BTF: tl.constexpr, BDS: tl.constexpr, PLANT: tl.constexpr,
):  # fmt: skip
    """Columns [d_lo, d_hi) of token block `tb`'s collapse, by a program that waits for the block's finishing
    program to publish pre (`_finish`): the same products and sums per element as the finisher's collapse. SHARE:
    the block's other SPLITS - 1 split programs, each its share (the launch is only made with every program resident
    at once: `launch`, at most one program per SM); TAIL: NCOL collapse programs queued after every mix program
    (`_hc_pre_kernel`). The last of the WAITERS programs through resets the flag and the count to zero for the next
    launch (all of them have seen the flag by then)."""
    seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    while seen == 0:
        seen = tl.atomic_add(flag_ptr, 0, sem="acquire")
    tl.debug_barrier()  # no thread reads pre before the acquire above
    if tl.atomic_add(done_ptr, 1, sem="relaxed") == WAITERS - 1:
        if PLANT != 4:  # planted bug: the flag left set, so the next launch's programs read pre before it is written
            tl.atomic_xchg(flag_ptr, 0)
        tl.atomic_xchg(done_ptr, 0)
    if PLANT == 3:  # planted bug: the next program's columns collapsed, this program's left unwritten
        width = d_hi - d_lo
        d_lo = d_hi % D
        d_hi = tl.minimum(d_lo + width, D)
    rows = tb * BT + tl.arange(0, BTF)
    rmask = rows < T
    rows = rows.to(tl.int64)
    hc_i = tl.arange(0, HC)[None, :]
    pre = tl.load(pre_ptr + rows[:, None] * HC + hc_i, mask=rmask[:, None], other=0.0, cache_modifier=".cg")
    _mhc.collapse(x_ptr, y_ptr, pre, rows, rmask, HC * D, D, d_lo, d_hi, HC, BTF, BDS)


@triton.jit
def _hc_pre_kernel(
    x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr, ws_ptr, cnt_ptr, T, D, norm_eps, hc_eps,
    iters, DS, HC: tl.constexpr, R: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
    SPLITS: tl.constexpr, BD: tl.constexpr, BTF: tl.constexpr, BDF: tl.constexpr, ROWWISE: tl.constexpr,
    APART: tl.constexpr, SHARE: tl.constexpr, BDS: tl.constexpr, PLANT: tl.constexpr, N_BLOCKS=0,
    TAIL: tl.constexpr = False, NCOL: tl.constexpr = 1, BDT: tl.constexpr = 512,
):  # fmt: skip
    NP: tl.constexpr = R * HC
    MIX: tl.constexpr = (2 + HC) * HC
    is_tail = False
    if TAIL:
        # one 1-D grid, programs numbered by a ticket taken on arrival: the SPLITS x N_BLOCKS mix programs (split
        # fastest), then N_BLOCKS x NCOL collapse programs. A collapse program waits for its block's finisher, which
        # holds a lower ticket, so it has started and will finish: no wait can block the programs it waits for
        n_blocks = N_BLOCKS
        n_mix = SPLITS * n_blocks
        ticket = tl.atomic_add(cnt_ptr + 3 * n_blocks, 1, sem="relaxed")
        if ticket == n_mix + n_blocks * NCOL - 1:  # the last ticket: every program has taken its own
            tl.atomic_xchg(cnt_ptr + 3 * n_blocks, 0)
        is_tail = ticket >= n_mix
        split = ticket % SPLITS
        tb = tl.where(is_tail, (ticket - n_mix) // NCOL, ticket // SPLITS)
    else:
        split = tl.program_id(0)
        tb = tl.program_id(1)
        n_blocks = tl.num_programs(1)
        n_mix = 0
        ticket = 0  # never a collapse program (is_tail stays False)
    K = HC * D
    stride_t = K
    rows = tb * BT + tl.arange(0, BT)
    rmask = rows < T
    rows = rows.to(tl.int64)  # row offsets of long batches pass 2^31 elements
    k_lo = split * KSPLIT
    k_hi = tl.minimum(k_lo + KSPLIT, K)
    if is_tail:  # TAIL: a collapse program, columns [col * BDT, (col + 1) * BDT) of block tb
        d_lo = ((ticket - n_mix) % NCOL) * BDT
        flag_ptr = cnt_ptr + n_blocks + tb
        # in tiles of BD columns: a 64-row tile BDT (512) wide holds 256 fp32 a thread at 4 warps, and spills
        BDC_T: tl.constexpr = BD if BD < BDT else BDT
        _collapse_share(x_ptr, pre_ptr, y_ptr, flag_ptr, flag_ptr + n_blocks, tb, T, D, d_lo, d_lo + BDT, NCOL, HC,
                        BT, BTF, BDC_T, PLANT)  # fmt: skip
    elif PLANT == 2:
        # planted bug: rsqrt before the projection, the normalized streams rounded back to bf16 (what a kernel
        # feeding a bf16 tensor-core GEMM would do); only meaningful with SPLITS == 1
        _, sq_all = _mhc.mix_partial(x_ptr, fn_ptr, rows, rmask, stride_t, K, 0, K, NP, MIX, BT, BK, ROWWISE, HC * HC)
        r = (1.0 / tl.sqrt(sq_all / K + norm_eps)).to(tl.float32)
        n = tl.arange(0, NP)
        acc = tl.zeros([BT, NP], dtype=tl.float64)
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            xt = tl.load(x_ptr + rows[:, None] * stride_t + k[None, :], mask=rmask[:, None] & (k < K)[None, :])
            xn = (xt.to(tl.float32) * r[:, None]).to(tl.bfloat16).to(tl.float32)
            fr, fvalid = _mhc.fn_rows(n, NP, MIX, HC * HC)
            w = tl.load(fn_ptr + fr[None, :] * K + k[:, None], mask=fvalid[None, :] & (k < K)[:, None], other=0.0)
            acc += tl.dot(xn, w, input_precision="ieee").to(tl.float64)
        _finish(acc, sq_all, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr, cnt_ptr, rows, rmask,
                stride_t, D, K, norm_eps, hc_eps, iters, 0, D, HC, R, BT, BD, APART, False, PLANT)  # fmt: skip
    else:
        acc, sq = _mhc.mix_partial(
            x_ptr, fn_ptr, rows, rmask, stride_t, K, k_lo, k_hi, NP, MIX, BT, BK, ROWWISE, HC * HC, PLANT
        )
        if SPLITS == 1:
            _finish(acc, sq, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr, cnt_ptr, rows, rmask,
                    stride_t, D, K, norm_eps, hc_eps, iters, 0, D, HC, R, BT, BD, APART, False, PLANT)  # fmt: skip
        else:
            _mhc.store_partial(ws_ptr, acc, sq, split, T, rows, rmask, NP, MIX)
            tl.debug_barrier()  # every thread's partial stores precede the release below
            arrived = tl.atomic_add(cnt_ptr + tb, 1, sem="acq_rel")
            # SHARE / TAIL: the block's flag (pre published) and count of programs through it, after the arrival
            # counters
            flag_ptr = cnt_ptr + n_blocks + tb
            if arrived == SPLITS - 1:
                tl.atomic_xchg(cnt_ptr + tb, 0)  # leave the counter zero for the next launch
                frows, fmask, facc, fsq = _mhc.finish_partials(ws_ptr, tb, T, NP, MIX, SPLITS, BT, BTF)
                # the columns it collapses: with SHARE its own share (BDS wide tiles), with TAIL none (the collapse
                # programs take them all), otherwise all of them
                d_lo = split * DS if SHARE else 0
                d_hi = d_lo + DS if SHARE else 0 if TAIL else D
                BDC: tl.constexpr = BDS if SHARE else BDF
                _finish(facc, fsq, x_ptr, scale_ptr, base_ptr, y_ptr, post_ptr, comb_ptr, pre_ptr, flag_ptr, frows,
                        fmask, stride_t, D, K, norm_eps, hc_eps, iters, d_lo, d_hi, HC, R, BTF, BDC, APART,
                        SHARE or TAIL, PLANT)  # fmt: skip
            elif SHARE:
                _collapse_share(x_ptr, pre_ptr, y_ptr, flag_ptr, flag_ptr + n_blocks, tb, T, D, split * DS,
                                split * DS + DS, SPLITS - 1, HC, BT, BTF, BDS, PLANT)  # fmt: skip


def share_plan(cfg: dict, splits: int, n_blocks: int, dim: int, sms: int) -> tuple[bool, int, int]:
    """(SHARE, columns per split program DS, its collapse tile width BDS) of a launch (`_collapse_share`): the split
    programs collapse a share of the columns each instead of the finishing program all of them. They wait on each
    other, so only where the whole grid fits at one program per SM (`sms` of them)."""
    share = cfg["SHARE"] and splits > 1 and not cfg["APART"] and splits * n_blocks <= sms
    ds = runtime.cdiv(dim, splits)
    return share, ds, min(runtime.next_pow2(ds), 1024)


def tail_plan(cfg: dict, splits: int, share: bool, dim: int) -> tuple[bool, int]:
    """(TAIL, collapse programs per token block NCOL) of a launch: a split launch whose programs cannot all be
    resident (no SHARE) queues BDT-column collapse programs after its mix programs, instead of the finishing program
    collapsing the block alone."""
    tail = cfg["TAIL"] and splits > 1 and not share and not cfg["APART"]
    return tail, runtime.cdiv(dim, cfg["BDT"]) if tail else 1


def launch(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps, out=None, plant=0):
    """The kernel behind `hc_pre`; `plant` (tests only) selects a planted bug: 1 comb transposed, 2 rsqrt applied
    to bf16-rounded streams before the projection; with SHARE (`_collapse_share`) 3 a waiting program collapses the
    next program's columns, 4 the block's flag is never reset; with TAIL 6 one collapse program short per
    block."""
    T, hc, D = x.shape
    if hc != hc_mult or hc & (hc - 1):
        raise ValueError(f"hc_pre: streams {hc} (hc_mult {hc_mult}) must be a power of two")
    x = x.contiguous()
    fn = hc_fn.float().contiguous()
    mix = (2 + hc) * hc
    if fn.shape != (mix, hc * D):
        raise ValueError(f"hc_pre: hc_fn {tuple(fn.shape)} != ({mix}, {hc * D})")
    if out is None:
        out = (
            torch.empty(T, D, dtype=x.dtype, device=x.device),
            torch.empty(T, hc, dtype=torch.float32, device=x.device),
            torch.empty(T, hc, hc, dtype=torch.float32, device=x.device),
        )
    y, post, comb = out
    if T == 0:
        return y, post, comb
    cfg = _mhc.config(T, D, "hc_pre", hc)
    R = runtime.next_pow2(2 + hc)
    splits = 1 if plant == 2 else runtime.cdiv(hc * D, cfg["KSPLIT"])
    n_blocks = runtime.cdiv(T, cfg["BT"])
    ws = _mhc.workspace(splits, T, mix, x.device)
    apart = cfg["APART"]
    share, ds, bds = share_plan(cfg, splits, n_blocks, D, runtime.sm_count(x.device))
    tail, ncol = tail_plan(cfg, splits, share, D)
    if plant == 6:  # planted bug: one collapse program short per block (its last BDT columns never collapsed)
        ncol -= 1
    cnt = _mhc.counters(x.device, 3 * n_blocks + 1)  # arrivals, then the flags and counts, TAIL's ticket
    pre = torch.empty(T, hc, dtype=torch.float32, device=x.device) if apart or share or tail else ws
    grid = (splits * n_blocks + n_blocks * ncol,) if tail else (splits, n_blocks)
    _hc_pre_kernel[grid](
        x, fn, hc_scale.float().contiguous(), hc_base.float().contiguous(), y, post, comb, pre, ws, cnt, T, D,
        float(norm_eps), float(hc_eps), int(sinkhorn_iters), ds,
        HC=hc, R=R, BT=cfg["BT"], BK=cfg["BK"], KSPLIT=cfg["KSPLIT"], SPLITS=splits, BD=cfg["BD"],
        BTF=cfg["BTF"], BDF=cfg["BDF"], ROWWISE=cfg["ROWWISE"], APART=apart, SHARE=share, BDS=bds, PLANT=plant,
        N_BLOCKS=n_blocks, TAIL=tail, NCOL=ncol, BDT=cfg["BDT"], num_warps=cfg["num_warps"], enable_fp_fusion=False,
    )  # fmt: skip
    if apart:
        bt, bd = _mhc.COLLAPSE_TILE
        _collapse_kernel[(runtime.cdiv(T, bt), runtime.cdiv(D, bd))](
            x, pre, y, T, D, HC=hc, BT=bt, BD=bd, num_warps=4, enable_fp_fusion=False
        )
    return y, post, comb


def hc_pre(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_mult, sinkhorn_iters, hc_eps, out=None):
    """Streams bf16 [T, hc, D] -> (y bf16 [T, D], post fp32 [T, hc], comb fp32 [T, hc, hc]). Every token is mixed
    alone (its numbers never depend on the batch), so `cu_seqlens` is not needed. `out`: optional (y, post, comb)
    buffers to write."""
    return launch(x, hc_fn, hc_scale, hc_base, norm_eps, hc_mult, sinkhorn_iters, hc_eps, out)

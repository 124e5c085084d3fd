"""Triton hc_head: collapse the final streams with sigmoid weights, one launch (spec §4.6 step 1).

Reference: parity.reference.model.hc_head (ParallelHead.hc_head)

Per block of tokens: mixes = (x_flat . hc_head_fn^T) * rsqrt(mean(x_flat^2) + norm_eps) exactly as hc_pre computes
them (`_mhc.mix_partial`: tensor-core dots of fn's exact bf16 pieces in BK chunks summed in float64, sum of
squares, rsqrt and product in float64, rounded once to fp32; the same K split and last-arriver finish), then the
twin's plain-torch op order:
`mixes * scale` and `+ base` as separate fp32 ops (no fma: they are separate torch kernels), sigmoid as
1/(1+exp(-x)) with IEEE division and exp evaluated in float64 (torch's own sigmoid is that expression with `expf`
on CUDA, spec §12.5, and a vectorized approximation on CPU), `+ hc_eps`, and y = sum_j pre[j] * x[j] in fp32 ->
bf16 (`_mhc.collapse`).

Tolerance: y (bf16) within 1 bf16 ulp of the float64 math beyond the twin's own error (the mixes and the exp round
differently from the twin's, by fp32 ulps that move a bf16 rounding only rarely). The 4 mixes are padded to 16
columns for the dot (its smallest width). Unverified without a GPU: as in hc_pre.
"""

import torch
import triton
import triton.language as tl

from parity.optimized.ops.triton import _mhc, runtime


@triton.jit
def _finish(
    acc, sq, x_ptr, scale_ptr, base_ptr, y_ptr, rows, rmask, stride_t, D, K, norm_eps, hc_eps,
    HC: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    r = 1.0 / tl.sqrt(sq / K + norm_eps)
    mix = (acc * r[:, None]).to(tl.float32)  # [BT, NP], columns >= HC are padding
    n = tl.arange(0, NP)[None, :]
    a = mix * tl.load(scale_ptr)
    a = a + tl.load(base_ptr + n, mask=n < HC, other=0.0)
    pre = _mhc.sigmoid_f32(a) + hc_eps
    # [BT, NP] -> [BT, HC]: keep the first HC columns (the padding columns are finite and dropped)
    pre = tl.reduce(tl.reshape(tl.where(n < HC, pre, 0.0), [BT, NP // HC, HC]), 1, _mhc.SUM)
    _mhc.collapse(x_ptr, y_ptr, pre, rows, rmask, stride_t, D, 0, D, HC, BT, BD)


@triton.jit
def _hc_head_kernel(
    x_ptr, fn_ptr, scale_ptr, base_ptr, y_ptr, ws_ptr, cnt_ptr, T, D, norm_eps, hc_eps,
    HC: tl.constexpr, NP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, KSPLIT: tl.constexpr,
    SPLITS: tl.constexpr, BD: tl.constexpr, BTF: tl.constexpr, BDF: tl.constexpr, ROWWISE: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    tb = tl.program_id(1)
    K = HC * D
    rows = tb * BT + tl.arange(0, BT)
    rmask = rows < T
    rows = rows.to(tl.int64)
    k_lo = split * KSPLIT
    k_hi = tl.minimum(k_lo + KSPLIT, K)
    acc, sq = _mhc.mix_partial(x_ptr, fn_ptr, rows, rmask, K, K, k_lo, k_hi, NP, HC, BT, BK, ROWWISE)
    if SPLITS == 1:
        _finish(acc, sq, x_ptr, scale_ptr, base_ptr, y_ptr, rows, rmask, K, D, K, norm_eps, hc_eps, HC, NP, BT, BD)
    else:
        _mhc.store_partial(ws_ptr, acc, sq, split, T, rows, rmask, NP, HC)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(cnt_ptr + tb, 1, sem="acq_rel")
        if arrived == SPLITS - 1:
            tl.atomic_xchg(cnt_ptr + tb, 0)  # leave the counter zero for the next launch
            frows, fmask, facc, fsq = _mhc.finish_partials(ws_ptr, tb, T, NP, HC, SPLITS, BT, BTF)
            _finish(facc, fsq, x_ptr, scale_ptr, base_ptr, y_ptr, frows, fmask, K, D, K, norm_eps, hc_eps, HC, NP, BTF,
                    BDF)  # fmt: skip


def hc_head(x, hc_fn, hc_scale, hc_base, cu_seqlens, norm_eps, hc_eps, out=None):
    """Final streams bf16 [T, hc, D] -> bf16 [T, D]. Tokens are mixed alone, so `cu_seqlens` is not needed.
    `out`: optional [T, D] buffer to write."""
    T, hc, D = x.shape
    if hc & (hc - 1) or hc > 16:
        raise ValueError(f"hc_head: {hc} streams; the kernel takes a power of two up to 16")
    x = x.contiguous()
    fn = hc_fn.float().contiguous()
    if fn.shape != (hc, hc * D):
        raise ValueError(f"hc_head: hc_head_fn {tuple(fn.shape)} != ({hc}, {hc * D})")
    y = torch.empty(T, D, dtype=x.dtype, device=x.device) if out is None else out
    if T == 0:
        return y
    cfg = _mhc.config(T, D, "hc_head")
    np_ = 16  # the dot's smallest width
    splits = runtime.cdiv(hc * D, cfg["KSPLIT"])
    n_blocks = runtime.cdiv(T, cfg["BT"])
    _hc_head_kernel[(splits, n_blocks)](
        x, fn, hc_scale.float().contiguous(), hc_base.float().contiguous(), y,
        _mhc.workspace(splits, T, hc, x.device), _mhc.counters(x.device, n_blocks), T, D, float(norm_eps),
        float(hc_eps), HC=hc, NP=np_, BT=cfg["BT"], BK=cfg["BK"], KSPLIT=cfg["KSPLIT"], SPLITS=splits, BD=cfg["BD"],
        BTF=cfg["BTF"], BDF=cfg["BDF"], ROWWISE=cfg["ROWWISE"], num_warps=cfg["num_warps"], enable_fp_fusion=False,
    )  # fmt: skip
    return y

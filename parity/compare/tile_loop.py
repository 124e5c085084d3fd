"""`FusedPass`'s tile arithmetic as one compiled loop (numba) for CPU pairs of bf16, fp16 or fp32 tiles.

The torch form of the tile pass (parity/compare/fused.py) makes about a dozen float64 sweeps over each tile: two
casts, x - y, the products, their row sums, |x - y|, the maxima, the ratio for max_rel, the column sums. Here every
element pair is read once from the raw tile, widened to float64 in registers, and every sum and maximum the metrics
need is updated in the same iteration; the loop is vectorized (AVX2 / AVX-512 where the CPU has them).

Same quantities as the torch form, same accuracy bounds:
- products x*y, x*x, y*y of bf16, fp16 or fp32 values are exact in float64 (at most 2 x 24 significand bits), so
  each sum is a float64 sum of exact terms, and x - y is the same rounded float64 difference; the sums are
  reassociated (the vectorizer keeps several partial sums), which stays within the bound of any float64 summation
  order, |error| <= n * 2**-53 * Σ|terms| (tests/compare/test_metrics_accuracy.py checks both forms against an exactly
  rounded reference). So the two forms agree within that bound, not bit for bit.
- maxima (max |x - y| per row, per column and per tile, max |x - y| / |x|) are exact in both forms: a maximum
  does not round. They are taken over the float64 bit patterns as int64 (non-negative doubles order as their bits),
  which the vectorizer reduces where it cannot reduce a float maximum.
- a tile holding a NaN or Inf on either side is found first from the raw bits (exponent all ones) and left to the
  torch form's masked path, which defines what non-finite values count as; this loop only ever sees finite values.

Also here: `worst_slice`, the lowest per-slice cosine (worst token, head, channel) from the sums the pass collected,
the same operations as the torch form's `fused.slice_cosines`, so the same bits.

Importing this module needs numba (a dependency); `FusedPass` imports it on first use and runs the torch form
where it cannot (a GPU image running from a source tree): the same metrics within the bound above.
"""

import math

import numba
import numpy as np
import torch

from parity.rawbits import FORMATS, UNSIGNED, bits, exponent_check, float_of, jit, raw, widen


def loop_for(a: torch.Tensor, b: torch.Tensor) -> "TileLoop | None":
    """The compiled tile loop for this pair of tiles, or None where the torch form must run (a GPU, or dtypes other
    than two bf16, two fp16 or two fp32 tiles)."""
    return _LOOPS[a.dtype] if applies(a.dtype, b.dtype, a.device, b.device) else None


def applies(a: torch.dtype, b: torch.dtype, *devices: torch.device) -> bool:
    """Whether pairs of these dtypes on these devices take the compiled loop (CPU, two bf16, fp16 or fp32)."""
    return a == b and a in _LOOPS and all(torch.device(d).type == "cpu" for d in devices)


class TileLoop:
    """The compiled loops for one dtype: `nonfinite(a, b)` from the raw bits, then `measure(...)` on a finite tile."""

    def __init__(self, view: torch.dtype, mask: int):
        self.view, self.mask = view, mask
        # the exponent check reads the bits as unsigned integers of the same width (`parity.rawbits.exponent_check`)
        self.unsigned, kind = UNSIGNED[view.itemsize]
        self._nonfinite = exponent_check(kind, mask)

    def nonfinite(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(self._nonfinite(raw(a, self.unsigned), raw(b, self.unsigned)))

    def measure(self, a, b, rows: int, cols: int, col: int, col_sums, col_err, atol: float | None, rtol: float):
        """One finite tile. Returns `(row_sums [4, rows], row_err [rows], tile max |e|, max |e| / |x|, mismatches)`
        and adds the tile's Σxy, Σxx, Σyy per inner position into `col_sums[:, col:col + cols]` and its max |e| into
        `col_err` (both None for a pair without inner dims)."""
        row_sums = np.empty((4, rows))
        row_err = np.empty(rows)
        sliced = col_sums is not None
        cs = col_sums.numpy() if sliced else np.zeros((3, 0))
        ce = col_err.numpy() if sliced else np.zeros(0)
        gate = math.inf if atol is None else atol  # atol None: no mismatch is counted (the caller ignores it)
        a, b = raw(a, self.view), raw(b, self.view)
        err, rel, mism = _measure(a, b, rows, cols, col, sliced, gate, rtol, row_sums, row_err, cs, ce)
        return torch.from_numpy(row_sums), torch.from_numpy(row_err), _float(err), _float(rel), int(mism)


def _float(b: int) -> float:
    return float(np.array(b, dtype=np.int64).view(np.float64))


# dtype -> its loops (`rawbits.FORMATS`: the integer view of its bits, which names the format to `rawbits.widen`, and
# the exponent mask). The measure loops below are plain module functions, compiled once per view type and cached on
# disk; the exponent checks are closures of their mask.
_LOOPS = {dtype: TileLoop(view, mask) for dtype, (view, mask) in FORMATS.items()}


@jit
def _row(ar, br, atol, rtol, sliced, cxy, cxx, cyy, cerr):
    """One row (or a row's piece): its sums and maxima, and with `sliced` the per-inner-position updates in the same
    iteration (one loop with the row reductions and the column stores vectorizes; two loops cost 1.6x). `sliced` is
    invariant in the loop: the compiler unswitches it into two loops."""
    sxy = sxx = syy = see = 0.0
    err = rel = mism = 0  # maxima as float64 bits (int64)
    for j in range(ar.shape[0]):
        x, y = widen(ar[j]), widen(br[j])
        e = x - y
        xy, xx, yy = x * y, x * x, y * y
        sxy += xy
        sxx += xx
        syy += yy
        see += e * e
        ae, ax = abs(e), abs(x)
        err = max(err, bits(ae))
        # max |e| / |x| over the positions that differ (0 / 0 is not a difference; e / 0 is inf)
        rel = max(rel, bits(ae / ax) if ae != 0.0 else 0)
        mism += (ae > atol + rtol * ax) & (ae != 0.0)
        if sliced:
            cxy[j] += xy
            cxx[j] += xx
            cyy[j] += yy
            cerr[j] = max(cerr[j], ae)
    return sxy, sxx, syy, see, err, rel, mism


@jit
def _measure(a, b, rows, cols, col, sliced, atol, rtol, row_sums, row_err, col_sums, col_err):
    tile_err = rel = mism = 0
    cxy, cxx, cyy = col_sums[0, col : col + cols], col_sums[1, col : col + cols], col_sums[2, col : col + cols]
    cerr = col_err[col : col + cols]
    for r in range(rows):
        ar, br = a[r * cols : (r + 1) * cols], b[r * cols : (r + 1) * cols]
        sxy, sxx, syy, see, err, rr, mm = _row(ar, br, atol, rtol, sliced, cxy, cxx, cyy, cerr)
        row_sums[0, r], row_sums[1, r], row_sums[2, r], row_sums[3, r] = sxy, sxx, syy, see
        row_err[r] = float_of(err)
        tile_err, rel, mism = max(tile_err, err), max(rel, rr), mism + mm
    return tile_err, rel, mism


def worst_slice(sums: torch.Tensor, err: torch.Tensor) -> tuple[int, float]:
    """`fused.worst_slice` on CPU float64 sums `[3+, k]` and maxima `[k]`, in one compiled pass: each slice's cosine by
    the same float64 operations as `fused.slice_cosines` (not reassociated: no fast-math here), the lowest picked as
    `argmin` picks it (the first NaN, else the first of equal minima). The torch form makes a dozen sweeps of tensor
    ops: for a decode step's [1, 8192] record, the per-channel worst slice was a third of its comparison."""
    s = sums.numpy()
    i, c = _worst_slice(s[0], s[1], s[2], err.numpy())
    return int(i), float(c)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _worst_slice(sxy, sxx, syy, err):
    best_i, best = 0, 0.0
    for i in range(err.shape[0]):
        if err[i] == 0.0:
            c = 1.0
        else:
            nx = math.sqrt(sxx[i]) if sxx[i] >= 0.0 else math.nan
            ny = math.sqrt(syy[i]) if syy[i] >= 0.0 else math.nan
            if nx == 0.0 or ny == 0.0:
                c = 1.0 if nx == ny else 0.0
            else:
                c = sxy[i] / (nx * ny)
                if not math.isnan(c):
                    c = min(1.0, max(-1.0, c))
        if math.isnan(c):
            return i, c
        if i == 0 or c < best:
            best_i, best = i, c
    return best_i, best

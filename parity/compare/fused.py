"""Every float metric of a tensor pair in one pass over row tiles, float64 math in reused buffers.

A pair of shape `[*lead, *inner]` (lead = the token dims) is seen as `R x C` rows. It is cut into tiles that are
contiguous in memory and in the file (whole rows, or pieces of one row when a row is larger than a tile), so the
same pass serves in-memory tensors and records streamed from disk. Per tile, in float64 buffers allocated once:
the products xy, xx, yy and ee (e = x - y) summed per row, xy, xx, yy summed per inner position, the per-row /
per-position largest |e|, max |e| and max |e| / |x|, with two host syncs (a few scalars each). Worst slices come
from those sums: rows give the worst token, inner positions summed over the other inner dims give the worst head and
channel.

Non-finite values are found without a mask pass: a tile whose Σ(x² + y²) is not finite holds an Inf or NaN (squares
of finite values below 1e154 cannot overflow float64, and bf16/fp16/fp8/fp32 never reach that; a finite tile whose
sum overflows takes the masked path too, which is exact for it, only slower), and only such a tile takes the masked
path (count NaN/Inf, zero the positions not finite on both sides, as the metrics define).

On the CPU, a finite tile pair of two bf16, fp16 or fp32 tiles takes a compiled loop instead (parity/compare/
tile_loop.py): the same quantities from one read of each element, ~3x faster, equal to this torch form within the
summation bound below (not bit for bit: its sums are reassociated). Float64 pairs, mixed dtypes, tiles with Inf/NaN
and GPU tiles take the torch form.

Accuracy: each sum is a float64 sum of exactly rounded float64 products, so |error| <= n * eps * Σ|terms| (n the
element count, eps = 2**-53), the bound of any float64 summation order; `rel_diff` is computed as Σe² / Σ(x² + y²),
which equals DeepGEMM's `1 - 2Σxy / Σ(x² + y²)` in exact math without its cancellation (tests/compare/
test_metrics_accuracy.py checks every metric against an exactly rounded reference within these bounds).
"""

import functools
import math

import torch

from parity.compiled import load_compiled

# elements per tile: 64 Ki float64 = 512 KiB per buffer, seven buffers stay in a core's L2/L3 slice
TILE = 1 << 16
# elements per tile of the compiled loop, which has no float64 buffers to keep in cache: larger tiles keep the Python
# work per tile (~20 us) small against its arithmetic (64 Ki -> 1 Mi: 1.5x the GB per CPU-second on 16 MiB records)
COMPILED_TILE = 1 << 20
# whole rows whose sums wait to be judged together (40 bytes each)
PENDING = 1 << 14


class Tiling:
    """How a tensor of `shape` with `token_dims` leading token dims is cut into contiguous tiles."""

    def __init__(self, shape: tuple[int, ...], token_dims: int, tile: int | None = None):
        self.shape, self.numel = tuple(shape), math.prod(shape)
        # slices exist when there is a dim after the token dims (as `compare_tensors` always defined them)
        self.sliced = len(shape) > token_dims
        self.lead = self.shape[:token_dims] if self.sliced else ()
        self.inner = self.shape[token_dims:] if self.sliced else ()
        self.cols = math.prod(self.inner) if self.sliced else self.numel
        self.rows = math.prod(self.lead) if self.sliced else (1 if self.numel else 0)
        self.heads = len(shape) >= token_dims + 2
        self.tile = tile or TILE

    def tiles(self):
        """`(row, col, rows, cols)` per tile, in memory order: `rows` whole rows, or one row's `cols` piece."""
        if self.numel == 0:
            return
        if self.cols <= self.tile:
            per = max(1, self.tile // self.cols)
            for r in range(0, self.rows, per):
                yield r, 0, min(per, self.rows - r), self.cols
        else:
            for r in range(self.rows):
                for c in range(0, self.cols, self.tile):
                    yield r, c, 1, min(self.tile, self.cols - c)

    def offset(self, row: int, col: int) -> int:
        """Flat element index of a tile's first element."""
        return row * self.cols + col


class FusedPass:
    """Accumulates one pair tile by tile (`add`), then `result()` gives the metric fields of `TensorMetrics`."""

    def __init__(self, tiling: Tiling, atol: float | None = None, rtol: float = 0.0, buffers: "Buffers | None" = None):
        self.t, self.atol, self.rtol = tiling, atol, rtol
        self.buf = buffers or Buffers()
        f64 = dict(dtype=torch.float64, device=self.buf.device)
        self.sums = torch.zeros(4, **f64)  # Σxy, Σxx, Σyy, Σee over finite-on-both positions
        self.max_abs, self.max_rel = 0.0, 0.0
        self.mismatches = 0
        self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0
        self.values_equal = True  # torch.equal of the float64 values (NaN anywhere makes it False)
        self.worst_row: tuple[int, float] | None = None
        # a row split over several tiles: its running sums and max |e|
        self.row_part = torch.zeros(4, **f64)
        self.row_part_err = 0.0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # whole rows' sums not yet judged
        self.pending_rows, self.pending_first = 0, 0
        if tiling.sliced:
            self.col_sums = torch.zeros(3, tiling.cols, **f64)  # Σxy, Σxx, Σyy per inner position
            self.col_err = torch.zeros(tiling.cols, **f64)

    def add(self, a: torch.Tensor, b: torch.Tensor, row: int, col: int, rows: int, cols: int) -> None:
        """One tile: `a`, `b` flat, `rows * cols` elements each, in any castable dtype."""
        loop = compiled_loop(a, b)
        if loop is not None and not loop.nonfinite(a, b):
            self._add_compiled(loop, a, b, row, col, rows, cols)
            return
        xy, e, p, s = self.buf.get(rows * cols)
        x, y = xy[0], xy[1]
        _cast(a, x)
        _cast(b, y)
        row_sums, row_err, squares, tile_err = self._measure(xy, e, p, rows, cols)
        finite = math.isfinite(squares)
        if not finite:
            self._nonfinite(x, y, e)
            row_sums, row_err, _, tile_err = self._measure(xy, e, p, rows, cols)
        if finite and self.atol is not None:
            self.mismatches += _mismatches_finite(x, e, s, self.atol, self.rtol)
        if tile_err > 0:
            self.max_rel = max(self.max_rel, _max_rel(x, e, s))
        if self.t.sliced:
            # per inner position only Σxy, Σxx, Σyy: the worst head / channel cosines need nothing else
            self.col_sums[:, col : col + cols] += p[:3].view(3, rows, cols).sum(1)
            seg = self.col_err[col : col + cols]
            torch.maximum(seg, e.view(rows, cols).amax(0), out=seg)
        self._tally(row_sums, row_err, tile_err, row, col, cols)

    def _add_compiled(self, loop, a, b, row: int, col: int, rows: int, cols: int) -> None:
        """A finite CPU tile of bf16, fp16 or fp32 pairs: the same quantities from one compiled loop
        (parity/compare/tile_loop.py), equal to the torch form's within the float64 summation bound. The loop adds
        the per-inner-position sums itself."""
        cols_out = (self.col_sums, self.col_err) if self.t.sliced else (None, None)
        row_sums, row_err, tile_err, rel, mism = loop.measure(a, b, rows, cols, col, *cols_out, self.atol, self.rtol)
        if self.atol is not None:
            self.mismatches += mism
        self.max_rel = max(self.max_rel, rel)
        self._tally(row_sums, row_err, tile_err, row, col, cols)

    def _tally(self, row_sums, row_err, tile_err: float, row: int, col: int, cols: int) -> None:
        """What both forms do with a measured tile: equality, max |e|, and its row sums (judged by row when sliced,
        else added to the totals)."""
        self.values_equal &= tile_err == 0.0
        self.max_abs = max(self.max_abs, tile_err)
        if self.t.sliced:
            self._rows(row_sums, row_err, row, col, cols)
        else:
            self.sums += row_sums.sum(-1)

    @staticmethod
    def _measure(xy, e, p, rows: int, cols: int):
        """e = |x - y|, the products xy, xx, yy, ee and their row sums, each row's max |e|; then one host sync
        for Σ(x² + y²) over the tile (not finite: an Inf or NaN is in it) and the tile's max |e|."""
        torch.sub(xy[0], xy[1], out=e)
        torch.mul(xy[0], xy[1], out=p[0])
        torch.mul(xy, xy, out=p[1:3])  # both squares in one op
        torch.mul(e, e, out=p[3])
        row_sums = p.view(4, rows, cols).sum(-1)  # [4, rows]
        e.abs_()
        row_err = e.view(rows, cols).amax(-1)  # [rows]
        squares, tile_err = torch.stack((row_sums[1:3].sum(), row_err.max())).tolist()
        return row_sums, row_err, squares, tile_err

    def _nonfinite(self, x, y, e) -> None:
        """The rare tile with Inf/NaN (`e` holds the raw |x - y|): count them, gate mismatches on the raw values,
        then zero them on both sides (the caller measures the tile again)."""
        nan_x, nan_y = x.isnan(), y.isnan()
        fin = x.isfinite() & y.isfinite()
        self.nan_a += int(nan_x.sum())
        self.nan_b += int(nan_y.sum())
        self.inf_a += int(x.isinf().sum())
        self.inf_b += int(y.isinf().sum())
        self.values_equal &= bool(torch.equal(x, y))
        if self.atol is not None:
            # equal infinities and NaN facing NaN are not mismatches; any other non-finite position is
            close = (e <= self.atol + self.rtol * x.abs()) | (x == y) | (nan_x & nan_y)
            self.mismatches += int((~close).sum())
        x.masked_fill_(~fin, 0.0)
        y.masked_fill_(~fin, 0.0)

    def _rows(self, row_sums, row_err, row, col, cols) -> None:
        """Rows this tile completes go to the pending batch; a row split over tiles is completed by its last one."""
        if cols == self.t.cols:
            self._pend(row_sums, row_err, row)
            return
        self.row_part += row_sums[:, 0]
        self.row_part_err = max(self.row_part_err, float(row_err[0]))
        if col + cols == self.t.cols:
            f64 = dict(dtype=torch.float64, device=self.row_part.device)
            self._pend(self.row_part[:, None].clone(), torch.tensor([self.row_part_err], **f64), row)
            self.row_part.zero_()
            self.row_part_err = 0.0

    def _pend(self, sums, err, first_row) -> None:
        # whole rows are judged in batches: a few small ops per PENDING rows instead of per tile
        if not self.pending:
            self.pending_first = first_row
        self.pending.append((sums, err))
        self.pending_rows += err.numel()
        if self.pending_rows >= PENDING:
            self._flush_rows()

    def _flush_rows(self) -> None:
        if not self.pending:
            return
        if len(self.pending) == 1:
            sums, err = self.pending[0]
        else:
            sums = torch.cat([p[0] for p in self.pending], dim=1)
            err = torch.cat([p[1] for p in self.pending])
        first_row, self.pending, self.pending_rows = self.pending_first, [], 0
        self.sums += sums.sum(-1)
        i, value = worst_slice(sums, err)
        # strict <: the first row of equal minima wins, as argmin over all rows at once would pick
        best = self.worst_row
        if best is None or value < best[1] or (math.isnan(value) and not math.isnan(best[1])):
            self.worst_row = (first_row + i, value)

    def result(self) -> dict:
        """The float metric fields (cos, max_abs, ..., worst slices) and the NaN/Inf counts."""
        self._flush_rows()
        xy, xx, yy, ee = (float(v) for v in self.sums)
        counts = dict(nan_a=self.nan_a, nan_b=self.nan_b, inf_a=self.inf_a, inf_b=self.inf_b)
        if self.atol is not None:
            counts["mismatches"] = self.mismatches
        if self.values_equal:
            return dict(cos=1.0, max_abs=0.0, max_rel=0.0, rel_l2=0.0, rel_diff=0.0, norm_ratio=1.0, **counts)
        nx, ny = math.sqrt(xx), math.sqrt(yy)
        return dict(
            cos=_cos(xy, nx, ny, self.max_abs == 0.0),
            max_abs=self.max_abs,
            max_rel=self.max_rel,
            rel_l2=_ratio(math.sqrt(ee), nx),
            rel_diff=0.0 if xx + yy == 0 else min(2.0, ee / (xx + yy)),
            norm_ratio=_ratio(ny, nx),
            worst_token=self._worst_token(),
            worst_head=self._worst_inner(-2) if self.t.heads else None,
            worst_channel=self._worst_inner(-1) if self.t.sliced else None,
            **counts,
        )

    def _worst_token(self):
        if self.worst_row is None:
            return None
        i, cos = self.worst_row
        # by hand: torch.unravel_index imports sympy on its first call (0.4 s of every compare's start)
        index = []
        for n in reversed(self.t.lead):
            i, j = divmod(i, n)
            index.append(j)
        return tuple(reversed(index)), cos

    def _worst_inner(self, dim: int):
        """Lowest cosine along one inner dim: the per-position sums summed over the other inner dims."""
        inner = self.t.inner
        keep = len(inner) + dim
        others = tuple(d for d in range(len(inner)) if d != keep)
        sums = self.col_sums.view(3, *inner).sum(dim=tuple(d + 1 for d in others)) if others else self.col_sums
        err = self.col_err.view(*inner).amax(dim=others) if others else self.col_err
        return worst_slice(sums, err)


def worst_slice(sums: torch.Tensor, err: torch.Tensor) -> tuple[int, float]:
    """The lowest of `slice_cosines(sums, err)` and its index as `argmin` picks it: the compiled pass
    (`tile_loop.worst_slice`) for CPU float64 sums where numba is there, else the torch form."""
    loops = _tile_loops()
    if loops is not None and sums.device.type == "cpu" and sums.dtype == err.dtype == torch.float64:
        return loops.worst_slice(sums, err)
    cos = slice_cosines(sums, err)
    i = int(cos.argmin())
    return i, float(cos[i])


def slice_cosines(sums: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """`[3+, k]` sums (Σxy, Σxx, Σyy, ...) and `[k]` max |x - y| -> `[k]` cosines with `rowwise_cosine`'s conventions:
    clamped to [-1, 1], 1 for equal slices, 1 for two zero slices and 0 for one zero slice against a non-zero one."""
    nx, ny = sums[1].sqrt(), sums[2].sqrt()
    cos = (sums[0] / (nx * ny)).clamp(-1.0, 1.0)
    cos = torch.where((nx == 0) | (ny == 0), (nx == ny).to(cos.dtype), cos)
    return torch.where(err == 0, torch.ones_like(cos), cos)


class Buffers:
    """Float64 work buffers of one worker, grown to the largest tile seen and reused for every tile after."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.size, self.device, self.views = 0, torch.device(device), {}

    def get(self, n: int):
        """Views of `n` elements: x and y as the rows of one `[2, n]` buffer (both squares in one op), |x - y|,
        the four products `[4, n]`, and a scratch buffer."""
        if n > self.size:
            self.size, self.views = n, {}
            f64 = dict(dtype=torch.float64, device=self.device)
            self.xy, self.p = torch.empty(2, n, **f64), torch.empty(4, n, **f64)
            self.e, self.s = torch.empty(n, **f64), torch.empty(n, **f64)
        if n not in self.views:  # most tiles of a record have one size: its views are made once
            if len(self.views) >= 16:  # ragged last tiles of many shapes: keep the cache small
                self.views = {}
            self.views[n] = (self.xy[:, :n], self.e[:n], self.p[:, :n], self.s[:n])
        return self.views[n]


def tile_for(a: torch.dtype, b: torch.dtype, device: torch.device | str = "cpu") -> int:
    """The tile size for pairs of these dtypes on `device`: larger where the compiled loop runs them."""
    loops = _tile_loops()
    return COMPILED_TILE if loops is not None and loops.applies(a, b, device) else TILE


def compiled_loop(a: torch.Tensor, b: torch.Tensor):
    """The compiled tile loop for this pair (parity/compare/tile_loop.py), or None: the torch form runs."""
    loops = _tile_loops()
    return None if loops is None else loops.loop_for(a, b)


@functools.cache
def _tile_loops():
    return load_compiled("parity.compare.tile_loop")


def castable(dtype: torch.dtype) -> bool:
    """Whether tiles of `dtype` can be cast to float64 (packed fp4 cannot; complex must be viewed as real first)."""
    try:
        _cast(torch.zeros(1, dtype=dtype), torch.empty(1, dtype=torch.float64))
        return not dtype.is_complex
    except (NotImplementedError, RuntimeError, TypeError):
        return False


def _cast(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.dtype == torch.bool:
        src = src.view(torch.uint8)
    elif src.is_floating_point() and src.element_size() == 1:
        # fp8 / e8m0 have no direct cast to float64 on every backend; float32 holds them exactly
        src = src.float()
    dst.copy_(src)


def _mismatches_finite(x, e, s, atol: float, rtol: float) -> int:
    """Elements with |x - y| > atol + rtol |x| (`e` holds |x - y|; equal values never mismatch, even if atol < 0)."""
    torch.abs(x, out=s)
    s.mul_(rtol).add_(atol)
    return int(((e > s) & (e != 0)).sum())


def _max_rel(x, e, s) -> float:
    """max |e| / |x| over a finite tile (`e` already |e|); 0 / 0 counts as 0, e / 0 as inf. Two passes: the signed
    ratio |e| / x, then its extremes (max |r| = max(-min r, max r))."""
    torch.div(e, x, out=s)
    lo, hi = torch.stack(torch.aminmax(s)).tolist()
    if math.isnan(lo) or math.isnan(hi):  # only 0 / 0 gives NaN here: those positions are equal
        lo, hi = torch.stack(torch.aminmax(s.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf))).tolist()
    return max(-lo, hi)


def _cos(xy: float, nx: float, ny: float, equal: bool) -> float:
    if equal:
        return 1.0
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, xy / (nx * ny)))


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den

"""Summary statistics stored instead of tensors in stats mode (`PARITY_DUMP_MODE=stats`), for runs too big to dump.

Keys (all over the finite elements, in float64): `numel`, `nan`, `inf`, `zeros`, `min`, `max`, `mean`, `std`,
`absmax`, `l2` (the Frobenius norm). Values that do not exist (no finite element) are stored as null.
Packed dtypes that torch cannot cast (fp4 x2) are summarised over their raw bytes.

One pass: Σx, Σx², min/max and the zero count. CPU tensors of bf16, fp16 or fp32 go through a compiled loop
(`parity.dump.stats_loop`) in chunks of CHUNK elements, each read once from its raw bits; a chunk holding a NaN or
Inf, other dtypes and machines without numba take the torch form: tiles cast into a reused float64 buffer, where a
tile holds a NaN or Inf exactly when its Σx² is not finite (squares of finite values below 1e154 stay finite), and
only such a tile is masked. The variance comes from Σx² - Σx·mean; when that cancels (variance below 1 % of mean²,
where the one-pass formula could lose digits) a second pass sums (x - mean)² instead.

GPU tensors take `device_sums`: the same sums accumulated on the device with nothing read back until the end (the
torch form's per-tile reads made stats mode slower than full mode on a GPU: H100, `bench/datapath.py --device cuda`,
2 GB, stats 2.81 s against full 0.87 s), and the second pass about the mean always (it is cheap there). The
background writer starts it on the forward's stream and reads the nine numbers on its own thread.
"""

import functools
import math

import torch

from parity.compiled import load_compiled

# 16 Ki elements: under torch's intra-op grain size, so each op runs on the calling thread (no thread team to wait on)
TILE = 1 << 14
# the device pass's tile: 4 Mi elements (a 32 MiB float64 cast and its temporaries on the device)
DEVICE_TILE = 1 << 22
# the compiled loop's chunk: 1 Mi elements (2 MiB of bf16) stay in L2 between the exponent check and the sums
CHUNK = 1 << 20
# below this variance / mean² the one-pass variance may have lost digits: take the exact second pass
_CANCELLATION = 1e-2


def sums_on_device(t: torch.Tensor) -> bool:
    """Whether `t` is summed where it lies (`device_sums`) rather than on the host: tensors off the CPU. The one rule
    for `tensor_stats` and the background writer, which starts the device sums on the forward's stream."""
    return t.device.type != "cpu"


def tensor_stats(t: torch.Tensor) -> dict[str, float | int | None]:
    if sums_on_device(t):
        return from_sums(t.numel(), device_sums(t).tolist())
    flat = _flat(t)
    buf = torch.empty(min(TILE, flat.numel()), dtype=torch.float64, device=flat.device)
    scratch = torch.empty_like(buf)
    acc = _Sums()
    loop = _compiled_loop(flat)
    step = CHUNK if loop is not None else TILE
    for start in range(0, flat.numel(), step):
        chunk = flat[start : start + step]
        if loop is not None and loop.finite(chunk):
            acc.add_finite(chunk.numel(), *loop.sums(chunk))
        else:
            for at in range(0, chunk.numel(), TILE):
                _torch_tile(_cast(chunk[at : at + TILE], buf), scratch, acc)
    n = acc.n
    std = _std(flat, buf, n, acc.s1, acc.s2) if n else None
    return _summary(t.numel(), n, acc.nan, acc.inf, acc.zeros, acc.lo, acc.hi, acc.s1, acc.s2, std)


def device_sums(t: torch.Tensor) -> torch.Tensor:
    """float64 [9] on t's device, nothing read back: finite count, NaN count, Inf count, zeros, min, max, Σx, Σx²
    (over the finite elements) and Σ(x - mean)² (the second pass, about the device's own mean). `from_sums` turns
    them into the stats; any device, the CPU included (the tests run it there)."""
    flat = _flat(t)
    dev, n_all = flat.device, flat.numel()
    acc = torch.tensor([0.0, 0.0, 0.0, 0.0, math.inf, -math.inf, 0.0, 0.0, 0.0], dtype=torch.float64, device=dev)
    buf = torch.empty(min(DEVICE_TILE, n_all), dtype=torch.float64, device=dev)
    for start in range(0, n_all, DEVICE_TILE):
        v = _cast(flat[start : start + DEVICE_TILE], buf)
        fin = v.isfinite()
        counts = torch.stack([fin.sum(), v.isnan().sum(), v.isinf().sum(), (v == 0).sum()])
        acc[:4] += counts.to(torch.float64)
        lo_hi = torch.stack([torch.where(fin, v, math.inf).amin(), torch.where(fin, v, -math.inf).amax()])
        acc[4] = torch.minimum(acc[4], lo_hi[0])
        acc[5] = torch.maximum(acc[5], lo_hi[1])
        vf = torch.where(fin, v, 0.0)
        acc[6] += vf.sum()
        acc[7] += (vf * vf).sum()
    mean = acc[6] / acc[0].clamp(min=1)
    for start in range(0, n_all, DEVICE_TILE):
        v = _cast(flat[start : start + DEVICE_TILE], buf)
        d = torch.where(v.isfinite(), v - mean, 0.0)
        acc[8] += (d * d).sum()
    return acc


def from_sums(numel: int, sums: list[float]) -> dict[str, float | int | None]:
    """The stats from `device_sums`' nine numbers (read back as a list)."""
    n, nan, inf, zeros, lo, hi, s1, s2, m2 = sums
    n = int(n)
    return _summary(numel, n, int(nan), int(inf), int(zeros), lo, hi, s1, s2, math.sqrt(m2 / n) if n else None)


def _summary(numel, n, nan, inf, zeros, lo, hi, s1, s2, std) -> dict[str, float | int | None]:
    return {
        "numel": numel,
        "nan": nan,
        "inf": inf,
        "zeros": zeros,
        "min": lo if n else None,
        "max": hi if n else None,
        "mean": s1 / n if n else None,
        "std": std,
        "absmax": max(abs(lo), abs(hi)) if n else None,
        "l2": math.sqrt(s2) if n else 0.0,
    }


def _flat(t: torch.Tensor) -> torch.Tensor:
    x = t.detach()
    if _uncastable(x):
        # packed dtypes (fp4 x2) cannot be cast: summarise their raw bytes rather than nothing
        x = x.contiguous().view(torch.uint8)
    if x.is_complex():
        x = torch.view_as_real(x)
    return x.reshape(-1)


class _Sums:
    """What the pass accumulates over chunks and tiles (finite elements only, but nan / inf / zeros over all)."""

    def __init__(self):
        self.n = self.nan = self.inf = self.zeros = 0
        self.s1 = self.s2 = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add_finite(self, n: int, s1: float, s2: float, zeros: int, lo: float, hi: float) -> None:
        self.n, self.s1, self.s2, self.zeros = self.n + n, self.s1 + s1, self.s2 + s2, self.zeros + zeros
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)


def _torch_tile(v: torch.Tensor, scratch: torch.Tensor, acc: _Sums) -> None:
    """The torch form on one tile already cast to float64."""
    sq = _sumsq(v, scratch)
    if not math.isfinite(sq):
        acc.nan += int(v.isnan().sum())
        acc.inf += int(v.isinf().sum())
        zeros = int((v == 0).sum())
        v = v[v.isfinite()]
        sq = _sumsq(v, scratch)
    else:
        zeros = v.numel() - int(torch.count_nonzero(v))
    acc.zeros += zeros
    if v.numel():
        mn, mx = torch.aminmax(v)
        acc.add_finite(v.numel(), float(v.sum()), sq, 0, float(mn), float(mx))


def _compiled_loop(flat: torch.Tensor):
    """The compiled pass for this tensor's dtype (CPU, contiguous bf16 / fp16 / fp32), or None: the torch form."""
    if flat.device.type != "cpu" or not flat.is_contiguous():
        return None
    loops = _stats_loops()
    return None if loops is None else loops.LOOPS.get(flat.dtype)


@functools.cache
def _stats_loops():
    return load_compiled("parity.dump.stats_loop")


def _std(flat: torch.Tensor, buf: torch.Tensor, n: int, s1: float, s2: float) -> float:
    mean = s1 / n
    var = (s2 - s1 * mean) / n
    if var >= _CANCELLATION * mean * mean:
        return math.sqrt(var)
    total = 0.0
    for start in range(0, flat.numel(), TILE):
        v = _cast(flat[start : start + TILE], buf)
        v = v[v.isfinite()] if not bool(v.isfinite().all()) else v
        v.sub_(mean)
        total += float((v * v).sum())
    return math.sqrt(total / n)


def _sumsq(v: torch.Tensor, scratch: torch.Tensor) -> float:
    # not torch.dot: BLAS runs its own thread team, which a busy machine turns into spinning
    sq = scratch[: v.numel()]
    torch.mul(v, v, out=sq)
    return float(sq.sum())


def _cast(src: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    out = buf[: src.numel()]
    if src.dtype == torch.bool:
        src = src.view(torch.uint8)
    elif src.is_floating_point() and src.element_size() == 1:
        src = src.float()  # fp8 / e8m0: no direct float64 cast on every backend; float32 holds them exactly
    out.copy_(src)
    return out


def _uncastable(t: torch.Tensor) -> bool:
    try:
        _cast(torch.zeros(1, dtype=t.dtype), torch.empty(1, dtype=torch.float64))
        return False
    except (NotImplementedError, RuntimeError, TypeError):
        return True

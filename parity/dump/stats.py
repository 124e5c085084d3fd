"""Summary statistics stored instead of tensors in stats mode (`PARITY_DUMP_MODE=stats`), for runs too big to dump.

Keys (all over the finite elements, in float64): `numel`, `nan`, `inf`, `zeros`, `min`, `max`, `mean`, `std`,
`absmax`, `l2` (the Frobenius norm). Values that do not exist (no finite element) are stored as null.
Packed dtypes that torch cannot cast (fp4 x2) are summarised over their raw bytes.

One pass over tiles cast into a reused float64 buffer: Σx, Σx², min/max and the zero count per tile.
A tile holds a NaN or Inf exactly when its Σx² is not finite (squares of finite values below 1e154 stay finite),
and only such a tile is masked. The variance comes from Σx² - Σx·mean; when that cancels (variance below 1 % of
mean², where the one-pass formula could lose digits) a second pass sums (x - mean)² instead.
"""

import math

import torch

# 16 Ki elements: under torch's intra-op grain size, so each op runs on the calling thread (no thread team to wait on)
TILE = 1 << 14
# below this variance / mean² the one-pass variance may have lost digits: take the exact second pass
_CANCELLATION = 1e-2


def tensor_stats(t: torch.Tensor) -> dict[str, float | int | None]:
    x = t.detach()
    if _uncastable(x):
        # packed dtypes (fp4 x2) cannot be cast: summarise their raw bytes rather than nothing
        x = x.contiguous().view(torch.uint8)
    if x.is_complex():
        x = torch.view_as_real(x)
    flat = x.reshape(-1)
    buf = torch.empty(min(TILE, flat.numel()), dtype=torch.float64, device=flat.device)
    scratch = torch.empty_like(buf)
    n = nan = inf = zeros = 0
    s1 = s2 = 0.0
    lo, hi = math.inf, -math.inf
    for start in range(0, flat.numel(), TILE):
        v = _cast(flat[start : start + TILE], buf)
        sq = _sumsq(v, scratch)
        if not math.isfinite(sq):
            nan += int(v.isnan().sum())
            inf += int(v.isinf().sum())
            zeros += int((v == 0).sum())
            v = v[v.isfinite()]
            sq = _sumsq(v, scratch)
        else:
            zeros += v.numel() - int(torch.count_nonzero(v))
        if v.numel():
            n += v.numel()
            s1 += float(v.sum())
            s2 += sq
            mn, mx = torch.aminmax(v)
            lo, hi = min(lo, float(mn)), max(hi, float(mx))
    mean = s1 / n if n else None
    return {
        "numel": t.numel(),
        "nan": nan,
        "inf": inf,
        "zeros": zeros,
        "min": lo if n else None,
        "max": hi if n else None,
        "mean": mean,
        "std": _std(flat, buf, n, s1, s2) if n else None,
        "absmax": max(abs(lo), abs(hi)) if n else None,
        "l2": math.sqrt(s2) if n else 0.0,
    }


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

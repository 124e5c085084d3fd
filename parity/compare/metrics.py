"""Pure comparison metrics over two tensors `a` (reference) and `b` (candidate), all computed in float64.

Conventions (each one keeps a metric defined where a naive formula gives NaN or > 1):
- bitwise equal tensors have cos exactly 1.0, every error exactly 0 (short-circuit, no float rounding);
- cos is clamped to [-1, 1]; two zero vectors have cos 1.0, one zero vector against a non-zero one has cos 0.0;
- float metrics are taken over the positions finite in both tensors; NaN/Inf are counted separately;
- `max_rel` is elementwise `|a - b| / |a|` (a zero in `a` facing a non-zero in `b` makes it inf): it is reported,
  not gated by default, because it is dominated by the smallest elements;
- integer tensors (indices) are compared exactly and, for ndim >= 2, as per-row sets (ties reorder top-k);
- fp8 / e8m0 are compared after a float cast, and bitwise through a uint8 view; packed fp4 only bitwise.
"""

import math
from dataclasses import dataclass

import torch

from parity.compare.fused import FusedPass, Tiling, castable, tile_for
from parity.dump.format import to_float64


@dataclass(frozen=True, slots=True)
class TensorMetrics:
    """Metrics of one pair. Float metrics are None where they do not apply (integer or packed tensors, stats)."""

    numel: int
    bitwise: bool
    cos: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    rel_l2: float | None = None
    rel_diff: float | None = None
    norm_ratio: float | None = None
    mismatches: int | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    # integer tensors: every row holds the same set of values
    sets_equal: bool | None = None
    # worst slices by cosine: (index, cos) along tokens (first dim, or [b, s]), heads (dim -2) and channels (dim -1)
    worst_token: tuple[tuple[int, ...], float] | None = None
    worst_head: tuple[int, float] | None = None
    worst_channel: tuple[int, float] | None = None


@dataclass(frozen=True, slots=True)
class LogitMetrics:
    """Token-level agreement of two logit tensors `[..., vocab]`, averaged over rows."""

    top1: float
    topk_overlap: float
    kl: float
    k: int


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included); works for fp8, e8m0 and packed fp4."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_bytes(a), _bytes(b))


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine of two float64 vectors, exactly 1.0 when they are equal, clamped to [-1, 1], 0/0 defined."""
    if torch.equal(x, y):
        return 1.0
    nx, ny = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, float(torch.dot(x, y) / (nx * ny))))


def rowwise_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`[n, m]` float64 rows -> `[n]` cosines with the conventions of `cosine`."""
    dot = (x * y).sum(-1)
    nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    cos = (dot / (nx * ny)).clamp(-1.0, 1.0)
    cos = torch.where((nx == 0) | (ny == 0), (nx == ny).to(cos.dtype), cos)
    return torch.where((x == y).all(-1), torch.ones_like(cos), cos)


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's `1 - 2Σxy / Σ(x² + y²)`: 0 for equal tensors, and unlike cos it grows with a scale error."""
    denom = float((x * x + y * y).sum())
    return 0.0 if denom == 0 else max(0.0, 1.0 - 2.0 * float((x * y).sum()) / denom)


def compare_tensors(
    a: torch.Tensor, b: torch.Tensor, *, atol: float | None = None, rtol: float = 0.0, token_dims: int = 1
) -> TensorMetrics:
    """All metrics of one pair of equally shaped tensors (dtypes may differ).

    Args:
        a (torch.Tensor):
            Reference tensor.
        b (torch.Tensor):
            Candidate tensor, same shape as `a`.
        atol (float, Optional):
            With `rtol`, counts `mismatches`: elements where `|a - b| > atol + rtol * |a|`.
            Default: `None` (not counted).
        rtol (float):
            Relative part of the mismatch tolerance. Default: `0.0`.
        token_dims (int):
            Leading dims that index tokens (1 for `[T, ...]`, 2 for `[b, s, ...]`), for the worst-token slice.
    """
    if a.shape != b.shape:
        raise ValueError(f"compare_tensors needs equal shapes, got {list(a.shape)} and {list(b.shape)}")
    bitwise = bitwise_equal(a, b)
    if not _is_float(a) and not _is_float(b):
        return _compare_integers(a, b, bitwise, atol, rtol)
    a, b = _real(a), _real(b)
    if bitwise:
        return _bitwise_metrics(a, atol)
    if not castable(a.dtype) or not castable(b.dtype):
        return TensorMetrics(numel=a.numel(), bitwise=bitwise)
    tiling = Tiling(tuple(a.shape), token_dims, tile_for(a.dtype, b.dtype, a.device))
    fused = FusedPass(tiling, atol, rtol)
    fa, fb = a.detach().reshape(-1), b.detach().reshape(-1)
    for row, col, rows, cols in tiling.tiles():
        start, n = tiling.offset(row, col), rows * cols
        fused.add(fa[start : start + n], fb[start : start + n], row, col, rows, cols)
    return metrics_of(fused, numel=a.numel(), bitwise=bitwise)


def metrics_of(fused: FusedPass, numel: int, bitwise: bool) -> TensorMetrics:
    """The `TensorMetrics` of a finished fused pass; bitwise pairs keep the exact short-circuit values."""
    fields = fused.result()
    if bitwise:
        fields.update(cos=1.0, max_abs=0.0, max_rel=0.0, rel_l2=0.0, rel_diff=0.0, norm_ratio=1.0)
        for k in ("worst_token", "worst_head", "worst_channel"):
            fields.pop(k, None)
    return TensorMetrics(numel=numel, bitwise=bitwise, **fields)


def _bitwise_metrics(a: torch.Tensor, atol: float | None) -> TensorMetrics:
    """A bitwise pair needs no arithmetic: exact short-circuit values, and NaN/Inf counted on one side (both hold
    the same bytes). Equal NaN and equal infinities are never mismatches."""
    counts = nonfinite_counts(a)
    exact = (
        dict(cos=1.0, max_abs=0.0, max_rel=0.0, rel_l2=0.0, rel_diff=0.0, norm_ratio=1.0) if castable(a.dtype) else {}
    )
    return TensorMetrics(
        numel=a.numel(),
        bitwise=True,
        mismatches=None if atol is None or not exact else 0,
        nan_a=counts[0],
        nan_b=counts[0],
        inf_a=counts[1],
        inf_b=counts[1],
        **exact,
    )


def nonfinite_counts(t: torch.Tensor) -> tuple[int, int]:
    """(NaN, Inf) counts; one pass when every value is finite (the usual case). Packed / integer dtypes: (0, 0)."""
    if not t.is_floating_point() or not castable(t.dtype):
        return 0, 0
    t = t.float() if t.element_size() == 1 else t
    if not t.numel():
        return 0, 0
    lo, hi = torch.aminmax(t)  # NaN propagates and an Inf is an extreme: one cheap pass (isfinite is 25x slower)
    if bool(lo.isfinite() & hi.isfinite()):
        return 0, 0
    return int(t.isnan().sum()), int(t.isinf().sum())


def _compare_integers(a, b, bitwise: bool, atol, rtol) -> TensorMetrics:
    """Index tensors: exact values and per-row sets (small tensors: plain float64 math)."""
    x, y = to_float64(a), to_float64(b)
    return TensorMetrics(
        numel=a.numel(),
        bitwise=bitwise,
        mismatches=None if atol is None else _mismatches(x, y, atol, rtol),
        max_abs=_max(torch.abs(x - y)),
        sets_equal=_sets_equal(a, b),
    )


def _real(t: torch.Tensor) -> torch.Tensor:
    """Complex as `[..., 2]` reals (the float metrics see real and imaginary parts as numbers)."""
    return torch.view_as_real(t) if t.is_complex() else t


def compare_logits(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> LogitMetrics:
    """Argmax agreement, top-k overlap (|top-k(a) ∩ top-k(b)| / k) and KL(softmax(a) || softmax(b)), per row."""
    x, y = to_float64(a), to_float64(b)
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    k = min(k, x.shape[-1])
    top1 = float((x.argmax(-1) == y.argmax(-1)).double().mean())
    ta, tb = x.topk(k, dim=-1).indices, y.topk(k, dim=-1).indices
    overlap = float((ta.unsqueeze(-1) == tb.unsqueeze(-2)).any(-1).sum(-1).double().mean() / k)
    la, lb = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    kl = float((la.exp() * (la - lb)).sum(-1).mean())
    return LogitMetrics(top1=top1, topk_overlap=overlap, kl=max(0.0, kl), k=k)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return words(t.detach().contiguous().reshape(-1).view(torch.uint8))


def words(raw: torch.Tensor) -> torch.Tensor:
    """Flat bytes as int64 words where they divide evenly (torch.equal compares words ~7x faster than bytes)."""
    if raw.numel() % 8 == 0 and raw.data_ptr() % 8 == 0:
        return raw.view(torch.int64)
    return raw


def _max(t: torch.Tensor) -> float:
    return float(t.max()) if t.numel() else 0.0


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def _mismatches(x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> int:
    # equal infinities and NaN facing NaN are not mismatches; any other non-finite position is
    close = (torch.abs(x - y) <= atol + rtol * torch.abs(x)) | (x == y) | (x.isnan() & y.isnan())
    return int((~close).sum())


def _sets_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.ndim < 2:
        return torch.equal(a.to(torch.int64), b.to(torch.int64))
    return torch.equal(a.to(torch.int64).sort(-1).values, b.to(torch.int64).sort(-1).values)


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def compare_stats(a: dict, b: dict) -> TensorMetrics:
    """What can be compared between two stats-mode summaries: norm ratio and NaN/Inf counts."""
    return TensorMetrics(
        numel=int(a["numel"]),
        bitwise=False,
        norm_ratio=_ratio(float(b["l2"]), float(a["l2"])),
        nan_a=int(a["nan"]),
        nan_b=int(b["nan"]),
        inf_a=int(a["inf"]),
        inf_b=int(b["inf"]),
    )

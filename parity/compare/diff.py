"""`compare_dumps`: every aligned pair of two dumps, measured and judged. The result rows feed `compare`,
`bisect` and the machine-readable reports.

A pair fails with a reason instead of being skipped or truncated: missing on one side (unless `allow_missing`
matches its name), shapes that no layout adapter lines up, rank shards that do not merge, or a threshold crossed.
"""

import functools
import math
import re
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

from parity.compare.align import Pair, Selection, align, fetch, missing_shards
from parity.compare.gate import Thresholds, judge, same_non_finite_positions
from parity.compare.layout import match_layouts, token_dims
from parity.compare.loader import Dump
from parity.compare.merge import shard_for
from parity.compare.metrics import LogitMetrics, TensorMetrics, compare_logits, compare_stats, compare_tensors
from parity.compare.namemap import NameMap
from parity.compare.report import shape_str
from parity.compare.stream import stream_metrics
from parity.compare.workers import run_ordered
from parity.dump.format import Record, parse_dtype
from parity.dump.stats import tensor_stats
from parity.errors import ParityError


@dataclass(frozen=True, slots=True)
class PairResult:
    """One aligned tensor's verdict. `order` is its position in side a's execution order."""

    order: int
    record: Record
    name: str
    status: str
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    missing: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    metrics: TensorMetrics | None = None
    logits: LogitMetrics | None = None

    @property
    def passed(self) -> bool:
        return self.status != "fail"

    def __bool__(self) -> bool:
        """Truthy on pass, so `assert compare_result` reads as a check."""
        return self.passed

    def to_row(self) -> dict:
        r, m, lg = self.record, self.metrics, self.logits
        return {
            "order": self.order,
            "status": self.status,
            "kind": r.kind,
            "phase": r.phase,
            "step": r.step,
            "layer": r.layer,
            "block": r.block,
            "module": r.module,
            "name": self.name,
            "call": r.call_in_step,
            "rank": r.rank,
            "shape_a": shape_str(self.shape_a),
            "shape_b": shape_str(self.shape_b),
            "dtype_a": self.dtype_a,
            "dtype_b": self.dtype_b,
            "bitwise": None if m is None else m.bitwise,
            "cos": None if m is None else m.cos,
            "max_abs": None if m is None else m.max_abs,
            "max_rel": None if m is None else m.max_rel,
            "rel_l2": None if m is None else m.rel_l2,
            "rel_diff": None if m is None else m.rel_diff,
            "norm_ratio": None if m is None else m.norm_ratio,
            "mismatches": None if m is None else m.mismatches,
            "nan_inf_a": None if m is None else f"{m.nan_a}/{m.inf_a}",
            "nan_inf_b": None if m is None else f"{m.nan_b}/{m.inf_b}",
            "worst_token": _slice(None if m is None else m.worst_token),
            "worst_head": _slice(None if m is None else m.worst_head),
            "worst_channel": _slice(None if m is None else m.worst_channel),
            "top1": None if lg is None else lg.top1,
            "topk_overlap": None if lg is None else lg.topk_overlap,
            "kl": None if lg is None else lg.kl,
            "reasons": "; ".join(self.reasons),
            "notes": "; ".join(self.notes),
        }


def compare_dumps(
    da: Dump,
    db: Dump,
    *,
    name_map: NameMap | None = None,
    thresholds: Thresholds | None = None,
    select: Selection | None = None,
    logits: str | None = None,
    top_k: int = 5,
    allow_missing: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    threads: int = 1,
    device: str = "cpu",
    stop_at_first_failure: bool = False,
    kinds: frozenset[str] | None = None,
) -> list[PairResult]:
    """Measure and judge every aligned pair of `da` (reference) and `db` (candidate).

    Args:
        name_map (NameMap, Optional):
            Renames, ignores and shard rules between the two dumps' names.
        thresholds (Thresholds, Optional):
            Pass/fail thresholds. Default: `Thresholds()` (cos >= 0.999, norm ratio within 1 %).
        select (Selection, Optional):
            Restrict to some phases, steps, layers or names.
        logits (str, Optional):
            Regex of the names that hold logits `[..., vocab]`; they also get top-1 / top-k / KL metrics.
        allow_missing (str, Optional):
            Regex of names that may be missing on one side (reported as `skip`). Default: none may be.
        threads (int):
            Pairs measured at once (one worker thread each, reading overlapped with the others' arithmetic).
        device (str):
            Where the float64 arithmetic runs (`cpu`, `cuda`). Default: `cpu`.
        stop_at_first_failure (bool):
            Stop after the first failing activation pair (what bisect needs); pairs missing on one side after it
            are still reported. Default: `False` (every pair).
        kinds (frozenset[str], Optional):
            Only these record kinds (`activation`, `weight`). Default: all.
    """
    name_map, thresholds = name_map or NameMap(), thresholds or Thresholds()
    for option, pattern in (("logits", logits), ("allow_missing", allow_missing)):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ParityError(f"{option} regex {pattern!r}: not a valid regex ({e})") from None
    pairs = align(da, db, name_map, select)
    if kinds is not None:
        pairs = [p for p in pairs if p.head.kind in kinds]
    if not pairs:
        raise ParityError(f"{da.root} vs {db.root}: no record to compare (the selection matched nothing)")
    args = (da, db, name_map, thresholds, logits, top_k, allow_missing)
    results = []
    measure = lambda i, pair, worker: _compare_pair(i, pair, *args, worker)
    with closing(run_ordered(pairs, measure, threads, device, light=_light)) as measured:
        for result in measured:
            results.append(result)
            if on_progress is not None:
                on_progress(len(results), len(pairs))
            if stop_at_first_failure and _first_failure(result):
                # what bisect needs is known: the pairs after it stay unread, except those missing on one side
                after = enumerate(pairs[result.order + 1 :], start=result.order + 1)
                results += [_compare_pair(i, p, *args, None) for i, p in after if p.missing]
                break
    return results


# a pair whose records hold less than this (per side) is measured on the calling thread (`workers.run_ordered`)
LIGHT_BYTES = 512 << 10


def _light(pair: Pair) -> bool:
    return all(math.prod(r.shape) * _itemsize(r.dtype) < LIGHT_BYTES for r in pair.a + pair.b)


@functools.cache
def _itemsize(dtype: str) -> int:
    return parse_dtype(dtype, "manifest").itemsize  # the loader checked every record's dtype


def _first_failure(r: PairResult) -> bool:
    return not r.passed and r.missing is None and r.record.kind == "activation"


def _compare_pair(i, pair: Pair, da, db, name_map, t: Thresholds, logits, top_k, allow_missing, worker) -> PairResult:
    """One pair's verdict; `worker` (a `stream.Worker`, or None) streams plain single-file pairs from disk."""
    head, ra, rb = pair.head, pair.a, pair.b
    base = dict(order=i, record=head, name=pair.name)
    if pair.missing is not None:
        allowed = allow_missing is not None and re.search(allow_missing, pair.name) is not None
        reasons = () if allowed else (f"missing in {pair.missing}",)
        return PairResult(**base, status="skip" if allowed else "fail", reasons=reasons, missing=pair.missing)
    shard = shard_for(pair, name_map)  # the map's rule, else the ranks' declared one
    base.update(dtype_a=ra[0].dtype, dtype_b=rb[0].dtype)
    # a dtype change fails unless asked for (a bf16 candidate against an fp32 reference): silently measuring
    # across it would hide a wrong cast
    changed = [f"dtype {ra[0].dtype} vs {rb[0].dtype}"] if ra[0].dtype != rb[0].dtype else []
    dtype_change, notes = ([], changed) if t.allow_dtype_change else (changed, [])
    if any(r.stats is not None for r in ra + rb):
        return _compare_stats(base, pair, da, db, shard, t, dtype_change, notes)
    metrics = None
    streamable = len(ra) == len(rb) == 1 and not pair.merged
    if worker is not None and streamable and not (logits is not None and re.search(logits, pair.name)):
        dims = token_dims(ra[0], ra[0].shape)
        metrics = stream_metrics(da, ra[0], db, rb[0], dims, t.atol, t.rtol, worker)
    # NaN/Inf on both sides must sit at the same positions: that needs the whole tensors (the path below); on one
    # side only, they cannot
    bad_a, bad_b = (metrics.nan_a + metrics.inf_a, metrics.nan_b + metrics.inf_b) if metrics is not None else (0, 0)
    if metrics is not None and not (bad_a and bad_b):
        base.update(shape_a=ra[0].shape, shape_b=rb[0].shape)
        same = not (bad_a or bad_b)
        reasons = (*dtype_change, *judge(metrics, t, weight=head.kind == "weight", same_positions=same))
        return PairResult(
            **base, status="fail" if reasons else "pass", reasons=reasons, notes=tuple(notes), metrics=metrics
        )
    (ta, pa), (tb, pb) = fetch(da, ra, shard, pair.merged), fetch(db, rb, shard, pair.merged)
    base.update(shape_a=tuple(ta.shape), shape_b=tuple(tb.shape))
    if pa or pb:
        return PairResult(**base, status="fail", reasons=tuple(f"a: {p}" for p in pa) + tuple(f"b: {p}" for p in pb))
    matched = match_layouts(ta, ra[0], tb, rb[0])
    if matched is None:
        reason = f"shape {list(ta.shape)} vs {list(tb.shape)} (no seq layout lines them up)"
        return PairResult(**base, status="fail", reasons=(*dtype_change, reason), notes=tuple(notes))
    ta, tb, note = matched
    notes += [note] if note else []
    dims = 1 if note else token_dims(ra[0], tuple(ta.shape))
    metrics = compare_tensors(ta, tb, atol=t.atol, rtol=t.rtol, token_dims=dims)
    lg = None
    if logits is not None and re.search(logits, pair.name) and ta.is_floating_point() and ta.ndim >= 1 and ta.numel():
        lg = compare_logits(ta, tb, top_k)
    non_finite = metrics.nan_a + metrics.inf_a + metrics.nan_b + metrics.inf_b
    same = non_finite == 0 or same_non_finite_positions(ta, tb)
    reasons = (*dtype_change, *judge(metrics, t, weight=head.kind == "weight", logits=lg, same_positions=same))
    status = "fail" if reasons else "pass"
    return PairResult(**base, status=status, reasons=reasons, notes=tuple(notes), metrics=metrics, logits=lg)


def _compare_stats(base, pair: Pair, da, db, shard, t: Thresholds, dtype_change: list[str], notes) -> PairResult:
    """Stats-mode records (either side) can only be compared on their summaries."""
    ra, rb = pair.a, pair.b
    (sa, pa), (sb, pb) = _stats(da, ra, shard, pair.merged), _stats(db, rb, shard, pair.merged)
    base.update(shape_a=ra[0].shape, shape_b=rb[0].shape)
    problems = [f"a: {p}" for p in pa] + [f"b: {p}" for p in pb]
    if problems or sa is None or sb is None:
        return PairResult(**base, status="fail", reasons=(*dtype_change, *problems))
    metrics = compare_stats(sa, sb)
    reasons = (*dtype_change, *judge(metrics, t, weight=base["record"].kind == "weight"))
    notes = (*notes, "stats mode: norm ratio and NaN/Inf only")
    return PairResult(**base, status="fail" if reasons else "pass", reasons=reasons, notes=notes, metrics=metrics)


def _stats(dump: Dump, records: tuple[Record, ...], shard, merged: bool) -> tuple[dict | None, list[str]]:
    if all(r.stats is None for r in records):
        t, problems = fetch(dump, records, shard, merged)
        return tensor_stats(t), problems
    if problems := missing_shards(records, merged):
        return None, problems
    if len(records) == 1 or shard is None:
        return records[0].stats, []
    if shard.reduce == "sum" or any(r.stats is None for r in records):
        return None, ["stats-mode partial sums / mixed modes cannot be merged across ranks"]
    stats = [r.stats for r in records]
    merged = {k: sum(s[k] for s in stats) for k in ("numel", "nan", "inf")}
    merged["l2"] = sum(s["l2"] ** 2 for s in stats) ** 0.5
    return merged, []


def _slice(worst) -> str | None:
    if worst is None:
        return None
    index, cos = worst
    index = ",".join(map(str, index)) if isinstance(index, tuple) else str(index)
    return f"{index} (cos {cos:.6f})"

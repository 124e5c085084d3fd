"""Passive bisect: walk judged pairs in execution order and name the first one that diverges.

A pure function over `PairResult`s (no I/O, no tensors), so it is tested on hand-built rows. Execution order is
side a's: phase by phase, step by step, layer by layer, and inside a layer the sub-modules in the order they
finished. The first failing record is where the error is introduced; everything after it may only inherit it.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from parity.compare.diff import PairResult


@dataclass(frozen=True, slots=True)
class LayerPoint:
    """One step of the per-layer curve: the records of one layer block at one phase and step."""

    phase: str | None
    step: int | None
    block: str | None
    layer: int | None
    records: int
    failed: int
    min_cos: float | None
    max_rel_diff: float | None
    max_norm_dev: float | None
    first_failure: str | None

    @property
    def passed(self) -> bool:
        return self.failed == 0

    def to_row(self) -> dict:
        return {
            "status": "pass" if self.passed else "fail",
            "phase": self.phase,
            "step": self.step,
            "block": self.block,
            "layer": self.layer,
            "records": self.records,
            "failed": self.failed,
            "min_cos": self.min_cos,
            "max_rel_diff": self.max_rel_diff,
            "max_norm_dev": self.max_norm_dev,
            "first_failure": self.first_failure,
        }


@dataclass(frozen=True, slots=True)
class BisectReport:
    first: PairResult | None
    curve: tuple[LayerPoint, ...]
    unmatched: tuple[PairResult, ...]

    @property
    def passed(self) -> bool:
        return self.first is None and all(r.passed for r in self.unmatched)

    def __bool__(self) -> bool:
        """Truthy on pass, so `assert compare_result` reads as a check."""
        return self.passed


def bisect(results: Sequence[PairResult]) -> BisectReport:
    """The first diverging activation record and the per-layer curve, from judged pairs."""
    walk = sorted((r for r in results if r.record.kind == "activation"), key=lambda r: r.order)
    present = [r for r in walk if r.missing is None]
    first = next((r for r in present if not r.passed), None)
    return BisectReport(first, tuple(_curve(present)), tuple(r for r in walk if r.missing is not None))


def _curve(rows: list[PairResult]) -> list[LayerPoint]:
    """Consecutive rows of one (phase, step, block) make one point, so embed -> layers -> head stay in order."""
    key = lambda r: (r.record.phase, r.record.step, r.record.block)
    return [_point(list(group)) for _, group in itertools.groupby(rows, key)]


def _point(group: list[PairResult]) -> LayerPoint:
    head = group[0].record
    metrics = [r.metrics for r in group if r.metrics is not None]
    failed = [r for r in group if not r.passed]
    return LayerPoint(
        phase=head.phase,
        step=head.step,
        block=head.block,
        layer=head.layer,
        records=len(group),
        failed=len(failed),
        min_cos=_extreme(min, [m.cos for m in metrics]),
        max_rel_diff=_extreme(max, [m.rel_diff for m in metrics]),
        max_norm_dev=_extreme(max, [abs(m.norm_ratio - 1) for m in metrics if m.norm_ratio is not None]),
        first_failure=failed[0].name if failed else None,
    )


def _extreme(pick, values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return pick(values) if values else None

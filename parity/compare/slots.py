"""Slot invariance: does a sequence's activation depend on which batch slot it sits in, or on its batch-mates?

Two experiments, both read from dumps tagged with a seq layout (`cu_seqlens` or `batch`) and request ids:
- one batch holding the same request in several slots: every slot is compared with the first slot of that request;
- a batch run against solo runs (`solos`): every slot is compared with the solo run of the same request.
Without request ids every slot is assumed to hold the same sequence (and the report says so).

Slot invariance is expected to be bitwise where kernels are batch-invariant, so the default tolerance is exact.
"""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from parity.compare.gate import Thresholds, judge
from parity.compare.layout import slot_slices
from parity.compare.loader import Dump
from parity.compare.metrics import compare_tensors
from parity.dump.format import Record
from parity.errors import ParityError

EXACT = Thresholds(exact=True)


@dataclass(frozen=True, slots=True)
class SlotResult:
    """One slot of one record against its reference slice (the first slot of its request, or a solo run)."""

    order: int
    record: Record
    slot: int
    request: str | None
    against: str
    status: str
    reasons: tuple[str, ...] = ()
    max_abs: float | None = None
    cos: float | None = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_row(self) -> dict:
        r = self.record
        return {
            "order": self.order,
            "status": self.status,
            "phase": r.phase,
            "step": r.step,
            "layer": r.layer,
            "block": r.block,
            "name": r.name,
            "call": r.call_in_step,
            "rank": r.rank,
            "slot": self.slot,
            "request": self.request,
            "against": self.against,
            "max_abs": self.max_abs,
            "cos": self.cos,
            "reasons": "; ".join(self.reasons),
        }


@dataclass(frozen=True, slots=True)
class SlotReport:
    rows: tuple[SlotResult, ...]
    skipped: int
    assumed_same: bool

    @property
    def first(self) -> SlotResult | None:
        """The first slot that differs, in execution order: the layer where slot dependence starts."""
        return next((r for r in self.rows if not r.passed), None)

    @property
    def passed(self) -> bool:
        return self.first is None

    def __bool__(self) -> bool:
        """Truthy on pass, so `assert compare_result` reads as a check."""
        return self.passed


def slot_invariance(
    dump: Dump,
    solos: Sequence[Dump] = (),
    *,
    thresholds: Thresholds = EXACT,
    on_progress: Callable[[int, int], None] | None = None,
) -> SlotReport:
    """Compare slots holding the same request within `dump`, and each slot against `solos` runs of its request."""
    solo_index = [_index(s) for s in solos]
    records = sorted(
        (r for r in dump.records if r.kind == "activation" and r.file is not None), key=lambda r: (r.rank, r.seq)
    )
    rows, skipped, assumed_same = [], 0, False
    for i, r in enumerate(records):
        slices = slot_slices(dump.load(r), r)
        if slices is None:
            skipped += 1
            continue
        requests = r.requests or (None,) * len(slices)
        assumed_same |= r.requests is None and len(slices) > 1
        first_slot: dict[str | None, int] = {}
        for slot, (req, x) in enumerate(zip(requests, slices)):
            if req in first_slot:
                ref = first_slot[req]
                rows.append(_judge(i, r, slot, req, f"slot {ref}", slices[ref], x, thresholds))
            else:
                first_slot[req] = slot
            for solo, index in zip(solos, solo_index):
                hit = _solo_slice(solo, index, r, req)
                if hit is not None:
                    rows.append(_judge(i, r, slot, req, f"solo {solo.root}", hit, x, thresholds))
        if on_progress is not None:
            on_progress(i + 1, len(records))
    if not rows:
        raise ParityError(
            f"{dump.root}: nothing to compare: no record holds one request in two slots and no solo run matches "
            "(tag runs with dump.phase(..., cu_seqlens=... or batch=..., requests=...))"
        )
    return SlotReport(tuple(rows), skipped, assumed_same)


def layer_summary(report: SlotReport) -> list[dict]:
    """Per (phase, step, layer block), in execution order: which slots differ and how much."""
    out = []
    key = lambda r: (r.record.phase, r.record.step, r.record.block, r.record.rank)
    for (phase, step, block, rank), group in itertools.groupby(report.rows, key):
        group = list(group)
        bad = [r for r in group if not r.passed]
        out.append(
            {
                "status": "fail" if bad else "pass",
                "phase": phase,
                "step": step,
                "block": block,
                "layer": group[0].record.layer,
                "rank": rank,
                "compared": len(group),
                "slots_differ": ",".join(str(s) for s in sorted({r.slot for r in bad})),
                "max_abs": max((r.max_abs for r in bad if r.max_abs is not None), default=None),
                "first_failure": bad[0].record.name if bad else None,
            }
        )
    return out


def _judge(order, record, slot, request, against, ref: torch.Tensor, x: torch.Tensor, t: Thresholds) -> SlotResult:
    base = dict(order=order, record=record, slot=slot, request=request, against=against)
    if ref.shape != x.shape:
        return SlotResult(**base, status="fail", reasons=(f"shape {list(x.shape)} vs {list(ref.shape)}",))
    m = compare_tensors(ref, x, atol=t.atol, rtol=t.rtol)
    reasons = tuple(judge(m, t))
    return SlotResult(**base, status="fail" if reasons else "pass", reasons=reasons, max_abs=m.max_abs, cos=m.cos)


def _index(dump: Dump) -> dict[tuple, list[Record]]:
    index: dict[tuple, list[Record]] = {}
    for r in dump.records:
        if r.kind == "activation" and r.file is not None:
            index.setdefault(r.ident, []).append(r)
    return index


def _solo_slice(solo: Dump, index: dict, record: Record, request: str | None) -> torch.Tensor | None:
    """The slice of `request` in the solo run's record with the same ident (and rank). Without request ids on
    either side (every slot assumed to hold one sequence), a one-sequence solo record is that sequence."""
    for s in index.get(record.ident, ()):
        if s.rank != record.rank:
            continue
        if s.requests is not None and request in s.requests:
            slot = s.requests.index(request)
        elif s.requests is None and request is None and s.num_slots == 1:
            slot = 0
        else:
            continue
        slices = slot_slices(solo.load(s), s)
        if slices is not None and slot < len(slices):
            return slices[slot]
    return None

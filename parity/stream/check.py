"""Two captures of the same verdict (e.g. streamed and not) compared record for record: same records in the same
order, each tensor the same dtype, shape and bytes (bitwise: -0.0 vs 0.0 and NaN payloads count)."""

import torch

RUNS = ("reference", "chained", "forced", "golden")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.is_floating_point() else t


def first_difference(a, b) -> str | None:
    """The first thing that differs between two captures (`parity.capture.session.Captures`, not imported: capture
    sits above this package), in execution order, or None when they are identical."""
    for run in RUNS:
        x, y = getattr(a, run), getattr(b, run)
        if (x is None) != (y is None):
            return f"{run}: captured in one and not the other"
        if x is None:
            continue
        names_x, names_y = [r.name for r in x.dump.records], [r.name for r in y.dump.records]
        if names_x != names_y:
            return f"{run}: the record sequences differ ({len(names_x)} vs {len(names_y)} records)"
        for rx, ry in zip(x.dump.records, y.dump.records):
            tx, ty = x.dump.load(rx), y.dump.load(ry)
            if tx.dtype != ty.dtype or tx.shape != ty.shape or not torch.equal(_bits(tx), _bits(ty)):
                return f"{run}: record {rx.name} (phase {rx.phase}, step {rx.step}) differs"
    # after the records: a wrong layer shows first where it computed, not in the tokens it changed later
    if a.targets.tokens != b.targets.tokens or a.targets.drafts != b.targets.drafts:
        return "targets: the reference's greedy tokens or MTP drafts differ"
    return None

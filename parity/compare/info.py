"""What a dump holds: a summary (records, runs, ranks, phases and steps, bytes) and one row per tensor name."""

import math

from parity.compare.loader import Dump
from parity.compare.report import phase_steps, phase_steps_str, shape_str, spans
from parity.dump.format import Record, parse_dtype


def dump_summary(dump: Dump) -> dict:
    records = dump.records
    layers = sorted({r.layer for r in records if r.layer is not None})
    return {
        "dir": str(dump.root),
        "records": len(records),
        "activations": sum(r.kind == "activation" for r in records),
        "weights": sum(r.kind == "weight" for r in records),
        "names": len({(r.kind, r.name) for r in records}),
        "runs": sorted({r.run for r in records}),
        "world_size": dump.world_size,
        "phases": phase_steps(r for r in records if r.kind == "activation"),
        "layers": spans(set(layers)) or None,
        "stats_mode": sum(r.stats is not None for r in records),
        "files": len({r.file for r in records if r.file is not None}),
        "tensor_bytes": sum(_bytes(r) for r in records if r.file is not None),
    }


def name_table(dump: Dump) -> list[dict]:
    """One row per (kind, name), in first-seen order: layer, class, dtypes, shapes, count, phases and steps."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in sorted(dump.records, key=lambda r: (r.rank, r.seq)):
        groups.setdefault((r.kind, r.name), []).append(r)
    rows = []
    for (kind, name), recs in groups.items():
        shapes = list(dict.fromkeys(shape_str(r.shape) for r in recs))
        rows.append(
            {
                "kind": kind,
                "name": name,
                "layer": recs[0].layer,
                "class": recs[0].cls,
                "io": recs[0].io,
                "dtype": ", ".join(dict.fromkeys(r.dtype for r in recs)),
                "shape": ", ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} shapes",
                "records": len(recs),
                "phases": phase_steps_str(recs),
                "mode": "stats" if all(r.stats is not None for r in recs) else "full",
            }
        )
    return rows


def _bytes(r: Record) -> int:
    return math.prod(r.shape) * parse_dtype(r.dtype, r.name).itemsize

"""Schema diff: do two dumps hold the same records (names, shapes, dtypes, tags), before any number is compared?

Differences are grouped: one row per (issue, name, a, b), with how many records it covers and at which phases and
steps, so a dtype that differs everywhere is one row per tensor name, not one per step.
"""

from dataclasses import dataclass

from parity.compare.align import Pair, Selection, align, merged_shape
from parity.compare.layout import packing
from parity.compare.loader import Dump
from parity.compare.merge import shard_for
from parity.compare.namemap import NameMap
from parity.compare.report import phase_steps_str, shape_str
from parity.dump.format import Record


@dataclass(frozen=True, slots=True)
class SchemaRow:
    """One kind of difference for one tensor name; `fails` is False for differences compare can absorb."""

    issue: str
    kind: str
    name: str
    a: str
    b: str
    fails: bool
    records: tuple[Record, ...]

    def to_row(self) -> dict:
        return {
            "status": "fail" if self.fails else "note",
            "issue": self.issue,
            "kind": self.kind,
            "name": self.name,
            "a": self.a,
            "b": self.b,
            "records": len(self.records),
            "phases": phase_steps_str(self.records),
        }


def schema_diff(
    da: Dump, db: Dump, name_map: NameMap | None = None, select: Selection | None = None
) -> list[SchemaRow]:
    """Records present on one side only, and aligned records whose shape, dtype or layer id differ."""
    name_map = name_map or NameMap()
    groups: dict[tuple, list[Record]] = {}
    for pair in align(da, db, name_map, select):
        for issue, a, b, fails in _differences(pair, name_map):
            groups.setdefault((issue, pair.head.kind, pair.name, a, b, fails), []).append(pair.head)
    return [SchemaRow(*key, records=tuple(recs)) for key, recs in groups.items()]


def _differences(pair: Pair, name_map: NameMap):
    if pair.missing is not None:
        desc = f"{pair.head.dtype} {shape_str(pair.head.shape)}"
        yield ("only in a", desc, "-", True) if pair.missing == "b" else ("only in b", "-", desc, True)
        return
    ra, rb = pair.a[0], pair.b[0]
    shard = shard_for(pair, name_map)  # the map's rule, else the ranks' declared one
    sa, sb = merged_shape(pair.a, shard), merged_shape(pair.b, shard)
    if sa != sb:
        packs = packing(sa, ra, sb, rb) is not None or packing(sb, rb, sa, ra) is not None
        yield "layout" if packs else "shape", shape_str(sa), shape_str(sb), not packs
    if ra.dtype != rb.dtype:
        yield "dtype", ra.dtype, rb.dtype, not (name_map.dtype_width and _family(ra.dtype) == _family(rb.dtype))
    if ra.layer != rb.layer:
        yield "layer", str(ra.layer), str(rb.layer), True


def _family(dtype: str) -> str:
    """`float` / `int` / the dtype itself: what a width-tolerant name map treats as one kind (`NameMap.dtype_width`)."""
    name = dtype.removeprefix("torch.")
    if name in ("float64", "float32", "bfloat16", "float16"):
        return "float"
    if name in ("int64", "int32", "int16"):
        return "int"
    return name

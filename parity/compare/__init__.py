"""Compare dumps: metrics, alignment, slot invariance, passive bisect and schema diffs.

Depends only on the dump file format (`parity.dump.format`), torch and pandas; never on model code, so dumps from
another machine or commit compare the same way.

    a, b = load_dump("dumps/ref"), load_dump("dumps/opt")
    results = compare_dumps(a, b, thresholds=Thresholds(min_cos=0.999))
    report = bisect(results)          # report.first: the first diverging record in execution order
"""

from parity.compare.align import Pair, Selection, align
from parity.compare.bisect import BisectReport, LayerPoint, bisect
from parity.compare.diff import PairResult, compare_dumps
from parity.compare.gate import Thresholds, judge
from parity.compare.loader import Dump, load_dump
from parity.compare.metrics import (
    LogitMetrics,
    TensorMetrics,
    bitwise_equal,
    compare_logits,
    compare_tensors,
    cosine,
    rel_diff,
)
from parity.compare.namemap import NameMap
from parity.compare.schema import SchemaRow, schema_diff
from parity.compare.slots import SlotReport, SlotResult, layer_summary, slot_invariance

__all__ = [
    "BisectReport",
    "Dump",
    "LayerPoint",
    "LogitMetrics",
    "NameMap",
    "Pair",
    "PairResult",
    "SchemaRow",
    "Selection",
    "SlotReport",
    "SlotResult",
    "TensorMetrics",
    "Thresholds",
    "align",
    "bisect",
    "bitwise_equal",
    "compare_dumps",
    "compare_logits",
    "compare_tensors",
    "cosine",
    "judge",
    "layer_summary",
    "load_dump",
    "rel_diff",
    "schema_diff",
    "slot_invariance",
]

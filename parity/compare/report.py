"""Machine-readable reports: result rows -> pandas DataFrame -> JSON (verdict, summary, rows) or CSV (rows).

JSON has no NaN or Infinity: missing values become null and infinities the strings "inf" / "-inf", so the output
parses with any strict JSON reader (jq, JavaScript).
"""

import json
import math
from collections.abc import Iterable

import pandas as pd

REPORT_VERSION = 1


def shape_str(shape: tuple[int, ...] | None) -> str | None:
    return None if shape is None else "[" + ", ".join(map(str, shape)) + "]"


def spans(values: set[int]) -> str:
    """{0, 1, 2, 5} -> "0-2,5"."""
    out: list[list[int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in out)


def phase_steps(records: Iterable) -> dict[str, str]:
    """`{"prefill": "0", "decode": "1-5"}`: the steps seen per phase ("-" for untagged records)."""
    steps: dict[str, set[int]] = {}
    for r in records:
        steps.setdefault(r.phase or "-", set()).update([] if r.step is None else [r.step])
    return {phase: spans(s) for phase, s in steps.items()}


def phase_steps_str(records: Iterable) -> str:
    """`prefill:0 decode:1-5`."""
    return " ".join(f"{p}:{s}" if s else p for p, s in phase_steps(records).items())


def frame(rows: Iterable[dict]) -> pd.DataFrame:
    # object columns keep ints as ints and None as None (a numeric column with a gap would turn 3 into 3.0)
    return pd.DataFrame(list(rows), dtype=object)


def to_json(command: str, passed: bool, summary: dict, table: pd.DataFrame, **sections) -> str:
    """`{"report_version", "command", "verdict", "summary", "rows", **sections}` as strict JSON."""
    payload = {
        "report_version": REPORT_VERSION,
        "command": command,
        "verdict": "pass" if passed else "fail",
        "summary": summary,
        "rows": _records(table),
        **{k: _records(v) if isinstance(v, pd.DataFrame) else v for k, v in sections.items()},
    }
    return json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n"


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)


def _records(table: pd.DataFrame) -> list[dict]:
    return table.to_dict(orient="records")


def _strict(obj):
    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj

"""Machine-readable reports: result rows -> `Frame` (a table) -> JSON (verdict, summary, rows) or CSV (rows).

JSON has no NaN or Infinity: missing values become null and infinities the strings "inf" / "-inf", so the output
parses with any strict JSON reader (jq, JavaScript).
"""

import json
import math
from collections.abc import Iterable

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


class Frame:
    """Result rows as a table, what `pandas.DataFrame(rows, dtype=object)` makes of them without importing pandas
    (~0.2 s of every command's start-up; only the CSV report needs it): a column per key any row has, in first-seen
    order, and a row's missing cells NaN. The values are kept as they are (an int stays an int, None stays None)."""

    def __init__(self, rows: Iterable[dict]):
        self.rows = list(rows)
        self.columns = list(dict.fromkeys(key for row in self.rows for key in row))

    def __len__(self) -> int:
        return len(self.rows)

    def records(self) -> list[dict]:
        """Every row with every column, in column order (`DataFrame.to_dict(orient="records")`)."""
        return [{c: row.get(c, math.nan) for c in self.columns} for row in self.rows]


def frame(rows: Iterable[dict]) -> Frame:
    return Frame(rows)


def to_json(command: str, passed: bool, summary: dict, table: Frame, **sections) -> str:
    """`{"report_version", "command", "verdict", "summary", "rows", **sections}` as strict JSON."""
    payload = {
        "report_version": REPORT_VERSION,
        "command": command,
        "verdict": "pass" if passed else "fail",
        "summary": summary,
        "rows": table.records(),
        **{k: v.records() if isinstance(v, Frame) else v for k, v in sections.items()},
    }
    return json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n"


def to_csv(table: Frame) -> str:
    import pandas as pd  # ~0.2 s of start-up: loaded for the CSV report only

    # object columns keep ints as ints and None as None (a numeric column with a gap would turn 3 into 3.0)
    return pd.DataFrame(table.rows, dtype=object).to_csv(index=False)


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
    return obj

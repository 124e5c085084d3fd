"""`metrics.csv`: one row per (run, site, field, phase) with the verdict's numbers, for a spreadsheet or a CI
dashboard. `run` is `forced` (the judged own errors) or `chained` (the engine on its own, not gated)."""

import csv
import io

from parity.report.tables import ratio

COLUMNS = (
    "run", "site", "layer", "submodule", "field", "phase", "rows", "compared", "bitwise", "max_err", "threshold",
    "ratio", "threshold_source", "flips", "flip_threshold", "failures", "first_step", "first_request",
    "first_position", "worst_step", "worst_request", "worst_position", "golden_ref", "golden_cand", "passed",
    "reasons",
)  # fmt: skip


def render(report: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for run in ("sites", "chained"):
        for r in report[run]:
            first = r.get("first_failure") or (None, None, None)
            worst = r.get("worst") or (None, None, None)
            w.writerow([
                "forced" if run == "sites" else "chained", r["site"], _v(r.get("layer")), r["submodule"], r["field"],
                r["phase"], r.get("rows", ""), r["compared"], r["bitwise"], repr(float(r["max_err"])),
                _v(r["threshold"]), repr(ratio(r)), r.get("threshold_source", ""), r["flips"],
                _v(r.get("flip_threshold")), r.get("failures", ""), *map(_v, first), *map(_v, worst),
                _v(r.get("golden_ref")), _v(r.get("golden_cand")), r["passed"], r.get("reasons", ""),
            ])  # fmt: skip
    return buf.getvalue()


def _v(v) -> str:
    # floats at full precision (repr round-trips), None as an empty cell
    if v is None:
        return ""
    return repr(float(v)) if isinstance(v, float) else str(v)

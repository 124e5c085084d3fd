"""`summary.json`: everything a report folder is rendered from, schema-versioned, and how the run was invoked.

    {"schema": "parity.report/1", "created": "<UTC ISO time>", "invocation": {...}, "report": {RunReport}}

`invocation` is what `repro.sh` reruns (case, checkpoint, device, backends env, calibration, golden, bisect,
plant); `report` is `parity.run.RunReport.to_dict()`, including the per-(request, position) rows of its worst site
(`rowmap`) that the heatmap plots. A reader refuses another schema and a malformed field with one line.
"""

import os
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from parity.errors import ParityError
from parity.io import read_json

SCHEMA = "parity.report/1"
BACKEND_ENV = ("PARITY_BACKEND", "PARITY_OPS")  # the env vars that select the optimized side's op backends


@dataclass
class Invocation:
    """A `parity run` as a user typed it, made location-independent: case files, checkpoints and calibrations
    are absolute paths; a built-in case stays its name."""

    case: str
    device: str = "cpu"
    checkpoint: str | None = None
    calibration: str | None = None
    golden: str = "auto"
    bisect: bool = False
    stream: bool = False
    plant: str | None = None
    threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # BACKEND_ENV values that were set
    cwd: str = ""
    python: str = ""  # the interpreter that ran it (repro.sh runs `python -m parity` with it)

    @classmethod
    def capture(cls, case: str, **kw) -> "Invocation":
        """The invocation of a run starting now: paths made absolute, the backend env read from the environment."""
        file_case = bool(Path(case).suffix)  # as `cases.load_case` tells a file from a built-in name
        for key in ("checkpoint", "calibration"):
            if kw.get(key) is not None:
                kw[key] = str(Path(kw[key]).resolve())
        env = {k: os.environ[k] for k in BACKEND_ENV if k in os.environ}
        return cls(
            str(Path(case).resolve()) if file_case else case, env=env, cwd=os.getcwd(), python=sys.executable, **kw
        )


def build_summary(report: dict, invocation: Invocation) -> dict:
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "invocation": asdict(invocation),
        "report": report,
    }


# the RunReport keys the renderers read, with their JSON types
_REPORT_KEYS = {
    "case": str,
    "passed": bool,
    "location": str,
    "noise": str,
    "sites": list,
    "chained": list,
    "requests": list,
    "backends": dict,
    "machine": dict,
    "timings": dict,
}
_SITE_KEYS = ("site", "field", "phase", "submodule", "max_err", "threshold", "bitwise", "passed", "flips", "compared")


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _triple(v) -> bool:  # (step, request, position)
    return v is None or (isinstance(v, list) and len(v) == 3 and _count(v[0]) and _count(v[2]))


_STR, _BOOL = (lambda v: isinstance(v, str), "a string"), (lambda v: isinstance(v, bool), "true or false")
_NUM, _COUNT = (_num, "a number"), (_count, "an integer >= 0")
_OPT_STR = (lambda v: v is None or isinstance(v, str), "a string or null")
_OPT_NUM = (lambda v: v is None or _num(v), "a number or null")
_OPT_COUNT = (lambda v: v is None or _count(v), "an integer >= 0 or null")
_TRIPLE = (_triple, "[step, request, position] or null")
# what the renderers read of each row (required) and may read (optional), with its JSON type
_SITE = {"site": _STR, "field": _STR, "phase": _STR, "submodule": _STR, "layer": _OPT_COUNT, "max_err": _NUM,
         "threshold": _OPT_NUM, "bitwise": _BOOL, "passed": _BOOL, "flips": _COUNT, "compared": _COUNT,
         "reasons": _STR}  # fmt: skip
_SITE_OPTIONAL = {"rows": _COUNT, "worst": _TRIPLE, "first_failure": _TRIPLE, "flip_threshold": _OPT_NUM,
                  "flip_margins": (lambda v: isinstance(v, list) and all(map(_num, v)), "a list of numbers"),
                  "threshold_source": _STR, "failures": _COUNT, "golden_ref": _OPT_NUM,
                  "golden_cand": _OPT_NUM, "ties": _COUNT}  # fmt: skip
_REQUEST = {"index": _COUNT, "prompt_len": _COUNT, "first_chunk": _COUNT, "tokens": _COUNT, "greedy_equal": _BOOL,
            "logits_max_err": _NUM, "mtp": _STR}  # fmt: skip
_REPORT_OPTIONAL = {"device": _STR, "wall_s": _NUM, "planted": _OPT_STR, "exact": _BOOL,
                    "noise_provenance": (lambda v: v is None or isinstance(v, dict), "an object or null"),
                    "rowmap": (lambda v: v is None or isinstance(v, dict), "an object or null")}  # fmt: skip
_INVOCATION = {"device": _STR, "golden": _STR, "checkpoint": _OPT_STR, "calibration": _OPT_STR, "plant": _OPT_STR,
               "threads": _OPT_COUNT, "bisect": _BOOL, "stream": _BOOL, "cwd": _STR, "python": _STR,
               "env": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                       "an object of strings")}  # fmt: skip
_ROWMAP = {"site": _STR, "field": _STR, "submodule": _STR, "run": _STR, "measure": _STR, "threshold": _OPT_NUM,
           "requests": (lambda v: isinstance(v, dict), "an object")}  # fmt: skip
# the heatmap is as wide as the largest position: bounded as `parity.report.rowmap` bounds it
MAX_POSITIONS = 4096


def _found(v) -> str:
    return repr(v)[:60] if v is None or isinstance(v, bool | int | float) else type(v).__name__


def _check(path: Path, where: str, obj, required: dict, optional: dict | None = None) -> None:
    """Every key of `required` present in the object `obj` with its type, and those of `optional` it has."""
    if not isinstance(obj, dict):
        raise ParityError(f"{path}: {where}: expected an object, found {_found(obj)}")
    for key, (ok, expected) in {**required, **(optional or {})}.items():
        if key not in obj:
            if key in required:
                raise ParityError(f"{path}: {where}.{key}: expected {expected}, found nothing")
        elif not ok(obj[key]):
            raise ParityError(f"{path}: {where}.{key}: expected {expected}, found {_found(obj[key])}")


def _check_rowmap(path: Path, rm: dict) -> None:
    _check(path, "report.rowmap", rm, _ROWMAP)
    for req, row in rm["requests"].items():
        where = f"report.rowmap.requests[{req!r}]"
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("positions"), list)
            or not isinstance(row.get("errors"), list)
        ):
            raise ParityError(f"{path}: {where}: expected an object with 'positions' and 'errors' lists")
        pos, errs = row["positions"], row["errors"]
        if len(pos) != len(errs):
            raise ParityError(f"{path}: {where}: {len(pos)} positions but {len(errs)} errors")
        bad = next((p for p in pos if not _count(p) or p >= MAX_POSITIONS), None)
        if bad is not None:
            raise ParityError(f"{path}: {where}.positions: expected integers in [0, {MAX_POSITIONS}), found {bad!r}")
        bad = next((e for e in errs if not (_num(e) or e == "inf")), None)
        if bad is not None:
            raise ParityError(f'{path}: {where}.errors: expected numbers (or "inf"), found {_found(bad)}')


def load_summary(folder: Path) -> dict:
    """The summary.json of a report folder, checked field by field against what the renderers read (one line
    naming the field, expected vs found, on error): a malformed summary is refused, never half-rendered."""
    path = Path(folder) / "summary.json"
    if not Path(folder).is_dir():
        what = "not a directory (expected a report folder)" if Path(folder).exists() else "no such report folder"
        raise ParityError(f"{folder}: {what}")
    data = read_json(path, f"{path}: no such file (not a report folder)", f"{path}: not readable JSON")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ParityError(f"{path}: schema: expected {SCHEMA!r}, found {found!r}")
    if not isinstance(data.get("invocation"), dict) or not isinstance(data["invocation"].get("case"), str):
        raise ParityError(f"{path}: invocation: expected an object with a 'case' string")
    _check(path, "invocation", data["invocation"], {}, _INVOCATION)
    if not isinstance(data.get("created"), str):
        raise ParityError(f"{path}: created: expected a string, found {_found(data.get('created'))}")
    report = data.get("report")
    if not isinstance(report, dict):
        raise ParityError(f"{path}: report: expected an object, found {type(report).__name__}")
    for key, kind in _REPORT_KEYS.items():
        if not isinstance(report.get(key), kind):
            found = type(report.get(key)).__name__ if key in report else "nothing"
            raise ParityError(f"{path}: report.{key}: expected {kind.__name__}, found {found}")
    _check(path, "report", report, {}, _REPORT_OPTIONAL)
    for run in ("sites", "chained"):
        for i, row in enumerate(report[run]):
            missing = [k for k in _SITE_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ParityError(f"{path}: report.{run}[{i}]: expected keys {_SITE_KEYS}, missing {missing}")
            _check(path, f"report.{run}[{i}]", row, _SITE, _SITE_OPTIONAL)
    for i, row in enumerate(report["requests"]):
        _check(path, f"report.requests[{i}]", row, _REQUEST)
    bad = next((k for k, v in report["timings"].items() if not _num(v)), None)
    if bad is not None:
        raise ParityError(f"{path}: report.timings.{bad}: expected a number, found {_found(report['timings'][bad])}")
    if report.get("rowmap"):
        _check_rowmap(path, report["rowmap"])
    return data

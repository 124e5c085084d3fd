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


def load_summary(folder: Path) -> dict:
    """The summary.json of a report folder, checked field by field (one line naming the field on error)."""
    path = Path(folder) / "summary.json"
    if not Path(folder).is_dir():
        raise ParityError(f"{folder}: no such report folder")
    data = read_json(path, f"{path}: no such file (not a report folder)", f"{path}: not readable JSON")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ParityError(f"{path}: schema: expected {SCHEMA!r}, found {found!r}")
    if not isinstance(data.get("invocation"), dict) or not isinstance(data["invocation"].get("case"), str):
        raise ParityError(f"{path}: invocation: expected an object with a 'case' string")
    report = data.get("report")
    if not isinstance(report, dict):
        raise ParityError(f"{path}: report: expected an object, found {type(report).__name__}")
    for key, kind in _REPORT_KEYS.items():
        if not isinstance(report.get(key), kind):
            found = type(report.get(key)).__name__ if key in report else "nothing"
            raise ParityError(f"{path}: report.{key}: expected {kind.__name__}, found {found}")
    for run in ("sites", "chained"):
        for i, row in enumerate(report[run]):
            missing = [k for k in _SITE_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ParityError(f"{path}: report.{run}[{i}]: expected keys {_SITE_KEYS}, missing {missing}")
    return data

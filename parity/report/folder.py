"""Write and re-render a report folder.

    <folder>/summary.json   schema parity.report/1: the RunReport and the invocation (written last: a folder
                            with a summary.json is complete)
    <folder>/report.html    self-contained page with the plots
    <folder>/report.md      the same as text
    <folder>/metrics.csv    one row per (run, site, field, phase)
    <folder>/repro.sh       reruns the case (executable)
    <folder>/repro/         kernel repros, when present (listed by the pages)

Every file is written atomically (`parity.io`). `render_folder` re-renders the pages and the CSV from
summary.json alone (`parity report DIR`).
"""

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from parity.io import atomic_write
from parity.report.repro_script import script
from parity.report.summary import Invocation, build_summary, load_summary

# the kernel repros' subfolder: `parity.repro.write_kernel_repros(report, folder, ...)` (issue 13 item 2) writes it
# before `write_folder` runs (the hook is marked in `commands/run.py`); the pages list what it holds
REPRO_DIR = "repro"
TIMESTAMP = "%Y%m%dT%H%M%SZ"


def default_folder(case_name: str, root: Path = Path("reports")) -> Path:
    """`reports/<case>/<UTC timestamp>`, with a suffix if two runs start within the same second."""
    base = root / case_name / datetime.now(UTC).strftime(TIMESTAMP)
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    return folder


def repro_files(folder: Path) -> list[str]:
    """Files under `<folder>/repro/`, relative to it, sorted."""
    root = Path(folder) / REPRO_DIR
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def write_folder(folder: Path, report: dict, invocation: Invocation) -> Path:
    """The whole folder for one run's `RunReport.to_dict()`; returns the path of report.html."""
    folder = Path(folder)
    summary = build_summary(report, invocation)
    _write(folder / "repro.sh", script(asdict(invocation)), 0o755)
    html = render_folder(folder, summary)
    _write(folder / "summary.json", json.dumps(summary, indent=1) + "\n")
    return html


def render_folder(folder: Path, summary: dict | None = None) -> Path:
    """report.html, report.md and metrics.csv from `summary` (default: the folder's summary.json); returns the
    path of report.html."""
    from parity.report import html, markdown, metrics_csv  # the plotting library loads only here

    folder = Path(folder)
    summary = summary if summary is not None else load_summary(folder)
    files = repro_files(folder)
    # all three rendered before any is written: a summary the renderers cannot draw replaces none of them
    pages = {"metrics.csv": metrics_csv.render(summary["report"]), "report.md": markdown.render(summary, files),
             "report.html": html.render(summary, files)}  # fmt: skip
    for name, text in pages.items():
        _write(folder / name, text)
    return folder / "report.html"


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    """Atomically, readable by all (a CI artifact, a web server): `mkstemp` would leave it 0600."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)  # before the rename: repro.sh is never visible without its execute bit

    return atomic_write(path, write)

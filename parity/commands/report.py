"""`parity report DIR`: re-render a report folder's report.md, report.html and metrics.csv from its summary.json."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from parity.commands._common import out
from parity.report.folder import render_folder


def report(folder: Annotated[Path, typer.Argument(help="A report folder (written by parity run / parity gate).")]):
    """Re-render a report folder (report.html, report.md, metrics.csv) from its summary.json."""
    page = render_folder(folder)
    out.print(f"report: {escape(str(page))}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)

"""`parity report DIR`: re-render a report folder's report.md, report.html and metrics.csv from its summary.json."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from parity.commands._common import out


def report(folder: Annotated[Path, typer.Argument(help="A report folder (written by parity run / parity gate).")]):
    """Re-render a report folder (report.html, report.md, metrics.csv) from its summary.json."""
    from parity.report.folder import render_folder  # loads when the command runs, not when the CLI starts

    page = render_folder(folder)
    out.print(f"report: {escape(str(page))}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)

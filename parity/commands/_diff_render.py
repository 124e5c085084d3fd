"""Terminal and machine output for the dump-reading commands: rich tables with coloured PASS/FAIL, a progress bar
on stderr while large dumps load, JSON/CSV reports, the closing `PASSED | ...` line and the exit code."""

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from parity.commands import _diff_options as opt
from parity.commands._common import EXIT_FAIL, EXIT_OK, err, out
from parity.errors import ParityError
from parity.io import atomic_write_text, check_output_file

# `parity.compare` loads when a command reads dumps, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.compare import Dump, PairResult
    from parity.compare.report import Frame

STATUS = {
    "pass": "[green]PASS[/green]",
    "fail": "[red]FAIL[/red]",
    "skip": "[yellow]SKIP[/yellow]",
    "note": "[yellow]NOTE[/yellow]",
}

# the columns of a table of `PairResult` rows (`compare`, `tp`): {column: header}
PAIR_COLUMNS = {
    "status": "",
    "phase": "phase",
    "step": "step",
    "layer": "layer",
    "name": "record",
    "shape_a": "shape",
    "cos": "cos",
    "max_abs": "max abs",
    "rel_diff": "rel diff",
    "norm_ratio": "norm ratio",
    "worst_token": "worst token",
    "reasons": "why",
}


def output_options(command: str) -> Callable[..., "Output"]:
    """The --json / --csv / --out option group of `command` (see `_diff_options.with_groups`)."""

    def output(json: opt.Json = False, csv: opt.Csv = False, out_file: opt.Out = None) -> Output:
        return Output(command, json, csv, out_file)

    return output


class Output:
    """Where a command's results go: a rich table on stdout, or JSON/CSV on stdout or in `--out`."""

    def __init__(self, command: str, json: bool, csv: bool, path: Path | None):
        if json and csv:
            raise ParityError("--json and --csv are exclusive: pick one")
        if path is not None and not (json or csv):
            if path.suffix not in (".json", ".csv"):
                raise ParityError(f"--out {path}: add --json or --csv (or name the file .json / .csv)")
            json, csv = path.suffix == ".json", path.suffix == ".csv"
        if path is not None:
            check_output_file(path, "--out")
        self.command, self.fmt, self.path = command, "json" if json else "csv" if csv else None, path
        self.start = time.perf_counter()

    @property
    def terminal(self) -> bool:
        """Whether the rich tables are printed (not when JSON/CSV goes to stdout)."""
        return self.fmt is None or self.path is not None

    def finish(self, passed: bool, summary: dict, table: "Frame", detail: str, **sections) -> None:
        """Write the machine report if asked, print the closing line, and exit 0 (pass) or 1 (parity failure)."""
        if self.fmt is not None:
            from parity.compare.report import to_csv, to_json

            text = to_json(self.command, passed, summary, table, **sections) if self.fmt == "json" else to_csv(table)
            if self.path is None:
                sys.stdout.write(text)
            else:
                atomic_write_text(self.path, text)
                out.print(f"wrote {escape(str(self.path))}")
        if self.terminal:
            seconds = time.perf_counter() - self.start
            status = "[green]PASSED[/green]" if passed else "[red]FAILED[/red]"
            out.print(f"{status} | {detail} | {seconds:.1f}s | parity {self.command}", markup=True)
        raise typer.Exit(EXIT_OK if passed else EXIT_FAIL)


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """An `on_progress(done, total)` callback drawing a bar on stderr; silent when stderr is not a terminal."""
    if not err.is_terminal:
        yield lambda done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def load(path: Path, label: str) -> "Dump":
    from parity.compare import load_dump

    with progress(f"loading {label}") as on_progress:
        return load_dump(path, on_progress)


def load_and_compare(dumps: opt.DumpPair, **kwargs) -> list["PairResult"]:
    """Load the name map and both dumps (checking every file) and judge every aligned pair, with progress bars."""
    from parity.compare import compare_dumps

    name_map = dumps.name_map()
    da, db = load(dumps.a, "a"), load(dumps.b, "b")
    with progress("comparing") as on_progress:
        return compare_dumps(da, db, name_map=name_map, on_progress=on_progress, **kwargs)


def table(title: str, frame: "Frame", columns: dict[str, str], limit: int = 0) -> Table:
    """A rich table of `frame`'s `columns` ({column: header}); with a limit, failing rows are kept first."""
    shown = frame.records()
    if limit and len(frame) > limit and "status" in frame.columns:
        bad = [row for row in shown if row["status"] != "pass"]
        shown = (bad or shown)[:limit]
        hidden = len(frame) - len(shown)
        title += f" ({hidden} more rows hidden: --limit 0 shows all)"
    t = Table(title=title, title_justify="left")
    for header in columns.values():
        t.add_column(header, overflow="fold")
    for row in shown:
        t.add_row(*(_cell(col, row.get(col)) for col in columns))
    return t


def _cell(col: str, value) -> str:
    if col == "status":
        return STATUS.get(value, str(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}" if col in ("cos", "min_cos") else f"{value:.4g}"
    return escape(str(value))

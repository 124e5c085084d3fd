"""`parity gate`: a suite of cases for CI: exit 0 pass, 1 a parity failure or regression, 2 bad input."""

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from parity.commands._common import err, finish, out
from parity.errors import ParityError
from parity.io import check_output_dir


def gate(
    suite: Annotated[Path, typer.Argument(help="Suite TOML: name and cases (built-in names or case files).")],
    out_dir: Annotated[Path, typer.Option("--out", help="gate.json, case report folders.")] = Path("reports/gate"),
    baseline: Annotated[Path | None, typer.Option(help="gate.json of an earlier run to compare site errors.")] = None,
    regression: Annotated[float, typer.Option(help="Fail a site whose error grew more than this factor.")] = 2.0,
) -> None:
    """Run every case of a suite with its own noise model; fail on any failing site or regression."""
    # the engine modules load when the command runs, not when the CLI starts (every command module is imported then)
    from parity.commands._progress import progress_bars
    from parity.gate import load_baseline, load_suite, run_gate

    spec = load_suite(suite)
    if not 1 <= regression < math.inf:
        raise ParityError(f"--regression: expected a finite factor >= 1, got {regression}")
    base = load_baseline(baseline) if baseline is not None else None
    check_output_dir(out_dir, "--out")
    with progress_bars() as steps:  # on stderr, only on a terminal
        result = run_gate(spec, out_dir, base, regression, progress=lambda m: err.print(escape(m)), steps=steps)
    for c in result.cases:
        mark = "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]"
        out.print(f"{mark} {escape(c['name'])} ({c['noise']}) {escape(c['location'])} report: {escape(c['report'])}")
    for r in result.regressions:
        out.print(f"[red]regression[/red] {escape(r)}")
    finish(result.passed, f"gate {spec.name} | {out_dir / 'gate.json'}")


def register(app: typer.Typer) -> None:
    app.command("gate")(gate)

"""`parity selftest`: planted V4 bugs must be caught and localized, clean runs must pass (exit 1 otherwise)."""

import math
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from parity.commands._common import EXIT_FAIL, check_device, err, out
from parity.errors import ParityError
from parity.io import check_output_dir


def selftest(
    case: Annotated[str, typer.Argument(help="Case to plant the bugs into (non-bitwise).")] = "cases/batched.toml",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Checkpoint parent dir (reports/<case>).")] = None,
    only: Annotated[str | None, typer.Option(help="Comma-separated bug names (default: all).")] = None,
    repeats: Annotated[int, typer.Option(help="Clean reruns: other admission orders and seeds, alternating.")] = 1,
    loosen: Annotated[float, typer.Option(help="Multiply every threshold (>= 1): shows a loose gate fails.")] = 1.0,
    device: Annotated[str, typer.Option(help="torch device for both models.")] = "cpu",
    calibration: Annotated[
        Path | None, typer.Option(help="Noise model JSON instead of the case's (e.g. one calibrated on a GPU backend).")
    ] = None,
) -> None:
    """Plant a library of realistic V4 bugs into the optimized side and check the verdict catches each one."""
    # the engine and selftest modules load when the command runs, not when the CLI starts (every command module is
    # imported then)
    from parity.cases import load_case
    from parity.compare.thresholds import NoiseModel
    from parity.run import noise_model, prepare_checkpoint
    from parity.selftest.bugs import library
    from parity.selftest.run import selftest as run_selftest
    from parity.selftest.run import selftest_refuses

    spec = load_case(case)
    selftest_refuses(spec)  # before the checkpoint is written
    check_device(device)
    bugs = library(spec.model_args().n_layers)
    if only is not None:
        names = {n.strip() for n in only.split(",") if n.strip()}
        unknown = sorted(names - {b.name for b in bugs})
        if unknown:
            raise ParityError(f"--only: unknown bug(s) {unknown}; known: {[b.name for b in bugs]}")
        bugs = [b for b in bugs if b.name in names]
    if repeats < 0:
        raise ParityError(f"--repeats: expected an integer >= 0, got {repeats}")
    if not 1 <= loosen < math.inf:
        raise ParityError(f"--loosen: expected a finite factor >= 1, got {loosen}")
    out_dir = out_dir or Path("reports") / spec.name
    check_output_dir(out_dir, "--out")
    noise = NoiseModel.load(calibration) if calibration is not None else noise_model(spec)
    if loosen != 1:
        noise = noise.loosened(loosen)
    ckpt = prepare_checkpoint(spec, None, out_dir)
    report = run_selftest(
        spec, ckpt, bugs, noise, repeats=repeats, device=device, progress=lambda m: err.print(escape(m))
    )
    table = Table(title=f"selftest on {spec.name} (noise: {report.noise})")
    for col in ("bug", "caught", "localized", "expected", "verdict"):
        table.add_column(col)
    for b in report.bugs:
        yes = lambda v: "[green]yes[/green]" if v else "[red]no[/red]"  # noqa: E731
        table.add_row(escape(b.name), yes(b.caught), yes(b.localized), escape(b.expected), escape(b.location[:160]))
    out.print(table)
    for c in report.clean:
        out.print(f"clean run {c.label}: {'[green]pass[/green]' if c.passed else '[red]FALSE ALARM[/red]'} "
                  f"{escape(c.location)}")  # fmt: skip
    n = len(report.bugs)
    status = "PASSED" if report.passed else "FAILED"
    out.print(f"{status} | caught {report.caught}/{n}, localized {report.localized}/{n}, "
              f"clean {sum(c.passed for c in report.clean)}/{len(report.clean)}")  # fmt: skip
    sys.stdout.flush()
    if not report.passed:
        raise typer.Exit(EXIT_FAIL)


def register(app: typer.Typer) -> None:
    app.command("selftest")(selftest)

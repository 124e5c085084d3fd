"""`parity judge`: the verdict of a `parity run --dump` dir again, offline (other thresholds, --json)."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from parity.commands._common import finish, out
from parity.commands.run import render_sites


def judge(
    run_dir: Annotated[Path, typer.Argument(help="A dir written by `parity run --dump`.")],
    calibration: Annotated[Path | None, typer.Option(help="Noise model JSON (default: the run's own).")] = None,
    chained: Annotated[bool, typer.Option(help="Judge the chained run instead of the forced one.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict rows as JSON.")] = False,
) -> None:
    """Judge saved runs again: every site's own error against a noise model, the golden where saved."""
    # the capture and verdict modules load when the command runs, not when the CLI starts (every command module is
    # imported then)
    from parity.capture.save import load_run
    from parity.compare.thresholds import NoiseModel
    from parity.compare.verdict import judge_run

    run = load_run(run_dir)
    if calibration is not None:
        noise = NoiseModel.load(calibration)
    else:
        noise = NoiseModel(exact=True, source="decode-exact") if run.exact else NoiseModel()
    candidate = run.chained if chained or run.forced is None else run.forced
    v = judge_run(run.reference, candidate, run.layout, run.n_layers, noise, golden=run.golden)
    rows = [r.to_row() for r in v.results]
    if as_json:
        out.print_json(json.dumps({"passed": v.passed, "location": v.location(), "noise": noise.source, "sites": rows}))
    else:
        render_sites(rows, f"{'chained' if chained else 'own'} error per site ({noise.source})")
        if v.location():
            out.print(f"[red]first divergence[/red]: {escape(v.location())}")
    finish(v.passed, str(run_dir), None if as_json else out)  # with --json, the JSON document alone


def register(app: typer.Typer) -> None:
    app.command("judge")(judge)

"""`parity calibrate`: measure a case's legitimate noise and write its noise model (thresholds with provenance)."""

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from parity.commands._common import check_device, err, out
from parity.io import check_output_file


def calibrate(
    case: Annotated[
        str, typer.Argument(help="Built-in case name or .toml case file (decode-exact: with a non-bitwise kernel).")
    ],
    out_file: Annotated[Path, typer.Option("--out", help="Noise model JSON to write (atomically).")],
    variations: Annotated[int, typer.Option(min=1, help="Clean runs: the case, other orders, schedules, seeds.")] = 6,
    device: Annotated[str, typer.Option(help="torch device for both models.")] = "cpu",
) -> None:
    """Run clean variations of a case and store each site's largest own error as its noise model."""
    # the engine and capture modules (pydantic's models among them) load when the command runs, not when the CLI
    # starts (every command module is imported then)
    from parity.calibrate import calibrate as run_calibration
    from parity.cases import load_case

    spec = load_case(case)
    check_device(device)
    check_output_file(out_file, "--out")
    with tempfile.TemporaryDirectory(prefix="parity-calibrate-") as work:
        model = run_calibration(spec, Path(work), variations, device, progress=lambda m: err.print(m))
    model.save(out_file)
    worst = sorted(model.errors.items(), key=lambda kv: -kv[1])[:8]
    for key, value in worst:
        out.print(f"  {key}: {value:.3g}")
    out.print(f"noise model: {out_file} ({len(model.errors)} site/field/phase entries, {variations} clean runs)")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)

"""`parity run`: the main job on a case (default: the built-in tiny V4 case, on CPU)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from parity.cases import load_case
from parity.commands._common import EXIT_FAIL, out
from parity.run import prepare_checkpoint, run_reference, write_summary


def run(
    case: Annotated[str, typer.Argument(help="Built-in case name or a .toml case file.")] = "tiny",
    checkpoint: Annotated[
        Path | None, typer.Option(help="An official-format checkpoint dir; default: write a synthetic one.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Report directory (default reports/<case>).")] = None,
    device: Annotated[str, typer.Option(help="torch device for the models.")] = "cpu",
) -> None:
    """Run a parity case: synthetic checkpoint, reference prefill + decode + MTP per request, summary table."""
    spec = load_case(case)
    out_dir = out_dir or Path("reports") / spec.name
    ckpt = prepare_checkpoint(spec, checkpoint, out_dir)
    summary = run_reference(spec, ckpt, device)
    report = write_summary(summary, out_dir)

    table = Table(title=f"parity run | case {spec.name} | reference on {device}")
    for col in ("req", "prompt", "decoded", "prefill ms", "decode ms/tok", "MTP accepted", "first tokens", "ok"):
        table.add_column(col, justify="right" if col not in ("first tokens", "ok") else "left")
    for r in summary.requests:
        table.add_row(
            str(r.index),
            str(r.prompt_len),
            str(len(r.tokens)),
            f"{r.prefill_ms:.0f}",
            f"{r.decode_ms_per_token:.1f}",
            f"{r.mtp_accepted}/{r.mtp_checked}",
            " ".join(map(str, r.tokens[:6])),
            "[green]PASS[/green]" if r.logits_finite else "[red]FAIL (non-finite logits)[/red]",
        )
    out.print(table)
    out.print(f"checkpoint: {ckpt}\nreport: {report}")
    status = "PASSED" if summary.ok else "FAILED"
    out.print(f"{status} | {spec.name} | {summary.wall_s:.1f}s | parity run {case}")
    if not summary.ok:
        raise typer.Exit(EXIT_FAIL)


def register(app: typer.Typer) -> None:
    app.command("run")(run)

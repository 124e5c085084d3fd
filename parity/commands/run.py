"""`parity run`: the main job on a case (default: the built-in tiny V4 case, on CPU)."""

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from parity.cases import load_case
from parity.commands._common import EXIT_FAIL, out
from parity.run import CaseReport, prepare_checkpoint, run_case, write_report


def _status(passed: bool) -> str:
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def _cos(value: float, bitwise: bool) -> str:
    return "bitwise" if bitwise else f"{value:.6f}"


def render(report: CaseReport) -> None:
    mode = "bitwise (decode-exact chunks)" if report.exact else f"min cos {report.min_cos}"
    table = Table(title=f"layers: optimized engine vs reference, {mode}")
    for col in ("module", "positions", "bitwise reqs", "min cos", "max |diff|", "worst", "status"):
        table.add_column(col, justify="left" if col in ("module", "worst", "status") else "right")
    for m in report.modules:
        table.add_row(
            m.module, str(m.positions), f"{m.bitwise_requests}/{m.requests}", _cos(m.min_cos, m.min_cos == 1.0 and
            m.bitwise_requests == m.requests), f"{m.max_abs:.3g}", m.worst, _status(m.passed),
        )  # fmt: skip
    out.print(table)
    table = Table(title="requests: emitted tokens")
    for col in ("req", "prompt", "first chunk", "tokens", "greedy equal", "logits", "MTP accepted", "status"):
        table.add_column(col, justify="right" if col not in ("logits", "status") else "left")
    for r in report.requests:
        table.add_row(
            str(r.index), str(r.prompt_len), str(r.first_chunk), str(r.tokens), "yes" if r.tokens_equal else "no",
            _cos(r.logits_min_cos, r.logits_bitwise), r.mtp, _status(r.passed),
        )  # fmt: skip
    out.print(table)


def run(
    case: Annotated[str, typer.Argument(help="Built-in case name or a .toml case file.")] = "tiny",
    checkpoint: Annotated[
        Path | None, typer.Option(help="An official-format checkpoint dir; default: write a synthetic one.")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report directory (default reports/<case>).")] = None,
    device: Annotated[str, typer.Option(help="torch device for both models.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
    dump_dir: Annotated[
        Path | None,
        typer.Option("--dump", help="Also dump the engine run here (an empty dir) for parity compare / bisect."),
    ] = None,
) -> None:
    """Run a parity case: the optimized engine against the reference, every layer at every position."""
    spec = load_case(case)
    if threads is not None:
        torch.set_num_threads(threads)
    out_dir = out_dir or Path("reports") / spec.name
    ckpt = prepare_checkpoint(spec, checkpoint, out_dir)
    report = run_case(spec, ckpt, device, dump_dir)
    path = write_report(report, out_dir)
    render(report)
    if report.first_failure:
        out.print(f"[red]first divergence[/red]: {report.first_failure}")
    out.print(f"checkpoint: {ckpt}\nreport: {path}")
    status = "PASSED" if report.passed else "FAILED"
    out.print(f"{status} | {spec.name} | {report.wall_s:.1f}s | parity run {case}")
    if not report.passed:
        raise typer.Exit(EXIT_FAIL)


def register(app: typer.Typer) -> None:
    app.command("run")(run)

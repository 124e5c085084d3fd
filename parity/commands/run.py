"""`parity run`: the main job on a case (default: the built-in tiny V4 case, on CPU)."""

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from parity.commands._common import EXIT_FAIL, check_device, err, out
from parity.errors import ParityError
from parity.io import check_output_dir

# the engine, capture and report modules load when the command runs, not when the CLI starts (every command module
# is imported then; `judge` imports this one for `render_sites`)
if TYPE_CHECKING:
    from parity.run import RunReport


def _status(passed: bool) -> str:
    return "[green]PASS[/green]" if passed else "[red]FAIL[/red]"


def _err(value: float, bitwise: bool) -> str:
    return "bitwise" if bitwise else f"{value:.3g}"


def render_sites(rows: list[dict], title: str) -> None:
    """One line per block: its worst site relative to that site's threshold."""
    table = Table(title=title)
    for col in ("block", "rows", "worst site", "phase", "error", "threshold", "flips", "status"):
        table.add_column(col, justify="right" if col in ("rows", "error", "threshold", "flips") else "left")
    blocks: dict[str, list[dict]] = {}
    for r in rows:
        block = ".".join(r["site"].split(".")[:2]) if r["site"].startswith(("layers.", "mtp.")) else "head"
        blocks.setdefault(block, []).append(r)
    for block, group in blocks.items():
        worst = max(group, key=lambda r: (not r["passed"], _ratio(r)))
        site = worst["site"].removeprefix(block + ".") + ("" if worst["field"] == "out" else f":{worst['field']}")
        table.add_row(
            block, str(sum(r["compared"] for r in group)), escape(site), worst["phase"],
            _err(worst["max_err"], all(r["bitwise"] for r in group)), f"{worst['threshold']:.3g}",
            str(sum(r["flips"] for r in group)), _status(all(r["passed"] for r in group)),
        )  # fmt: skip
    out.print(table)


def _ratio(r: dict) -> float:
    return r["max_err"] / r["threshold"] if r["threshold"] else (0.0 if r["bitwise"] else float("inf"))


def render(report: "RunReport") -> None:
    from parity import machine
    from parity.report import tables

    out.print(f"machine: {escape(machine.summary())}")
    odd = {op: b for op, b in report.backends.items() if b != "torch"}
    out.print(f"ops: {escape(', '.join(f'{o}={b}' for o, b in odd.items()) or 'all torch')}; noise: {report.noise}")
    mismatch = tables.noise_mismatch(report.to_dict())
    if mismatch:
        out.print(f"[yellow]noise model[/yellow]: {escape(mismatch)}")
    if report.planted:
        out.print(f"[yellow]planted bug[/yellow]: {escape(report.planted)} (selftest library, optimized side only)")
    engine = report.backends.get("candidate", "the optimized engine")  # another candidate: its name and version
    render_sites(report.sites, f"own error per site: {engine} teacher-forced with the reference")
    table = Table(title=f"requests: chained run ({engine} on its own)")
    for col in ("req", "prompt", "first chunk", "tokens", "greedy equal", "logits max err", "MTP accepted"):
        table.add_column(col, justify="right")
    for r in report.requests:
        table.add_row(
            str(r.index), str(r.prompt_len), str(r.first_chunk), str(r.tokens), "yes" if r.greedy_equal else "no",
            f"{r.logits_max_err:.3g}", r.mtp,
        )  # fmt: skip
    out.print(table)
    failing = [r for r in report.sites if not r["passed"]]
    for r in failing[:12]:
        out.print(f"  [red]fail[/red] {escape(r['site'])}:{r['field']} ({r['phase']}): {escape(r['reasons'])}")
    if len(failing) > 12:
        out.print(f"  ... and {len(failing) - 12} more failing (site, field, phase) rows in the JSON report")


def run(
    case: Annotated[str, typer.Argument(help="Built-in case name or a .toml case file.")] = "tiny",
    checkpoint: Annotated[
        Path | None, typer.Option(help="An official-format checkpoint dir; default: write a synthetic one.")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report folder (default reports/<case>/<UTC timestamp>).")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device for both models.")] = "cpu",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch (default: torch's choice).")] = None,
    dump_dir: Annotated[
        Path | None,
        typer.Option("--dump", help="Also write the runs here (an empty dir): parity judge / compare / bisect."),
    ] = None,
    golden: Annotated[str, typer.Option(help="When to run the float64 golden: auto | always | never.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")] = False,
    bisect: Annotated[
        bool, typer.Option("--bisect", help="Active bisect: replays that name the first bad layer.")
    ] = False,
    calibration: Annotated[
        Path | None, typer.Option(help="Noise model JSON instead of the case's (e.g. one calibrated on a GPU backend).")
    ] = None,
    plant: Annotated[
        str | None,
        typer.Option(help="Plant this bug of the selftest library into the optimized side (see parity selftest)."),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="Layer-streamed weights: one layer in memory at a time; prints peak RSS.")
    ] = False,
) -> None:
    """Run a parity case: the optimized engine against the reference, every site at every position."""
    from parity.capture.session import GOLDEN
    from parity.cases import load_case
    from parity.commands._progress import progress_bars
    from parity.compare.thresholds import NoiseModel
    from parity.report.folder import default_folder, write_folder
    from parity.report.summary import Invocation
    from parity.repro import write_kernel_repros
    from parity.run import planted_bug, prepare_checkpoint, run_case, write_report

    spec = load_case(case)
    spec = spec.streamed() if stream else spec  # as the case key `[model] stream = true`
    if golden not in GOLDEN:
        raise ParityError(f"--golden: expected one of {', '.join(GOLDEN)}, got {golden!r}")
    check_device(device)
    if plant is not None:
        planted_bug(spec, plant)  # an unknown name is refused before any work
    # every output is checked before the minutes of work, so a run never dies at its final write
    folder = out_dir or default_folder(spec.name)
    check_output_dir(folder, "--out")
    # the synthetic checkpoint goes in --out DIR; by default one per case, next to its timestamped report folders
    # (the same draw each run: a folder per run would pile up copies of the weights)
    ckpt_root = out_dir if out_dir is not None else folder.parent
    if dump_dir is not None:
        check_output_dir(dump_dir, "--dump", must_be_empty=True)
    if threads is not None:
        most = 4 * (os.cpu_count() or 1)  # torch's thread pools crash (SIGSEGV) on absurd counts
        if threads > most:
            raise ParityError(f"--threads {threads}: expected at most {most} (4 x this machine's {most // 4} CPUs)")
        torch.set_num_threads(threads)
    noise = NoiseModel.load(calibration) if calibration is not None else None  # before the minutes of work
    invocation = Invocation.capture(
        case, device=device, checkpoint=checkpoint, calibration=calibration, golden=golden, bisect=bisect,
        stream=stream, plant=plant, threads=threads,
    )  # fmt: skip
    # a failed run keeps its captures for its kernel repros (below), which record from them instead of running the
    # case again. A streamed run writes none: recording runs the engine with every layer loaded.
    kept = {}

    def keep(report, captures) -> None:
        if not report.passed and not spec.stream:
            kept["captures"] = captures

    with progress_bars() as progress:  # on stderr, only on a terminal
        ckpt = prepare_checkpoint(spec, checkpoint, ckpt_root, progress)
        report = run_case(
            spec, ckpt, device, dump_dir, golden=golden, bisect=bisect, noise=noise, plant=plant, progress=progress,
            then=keep,
        )  # fmt: skip
    if report.memory is not None:
        (err if as_json else out).print(escape(report.memory["line"]))
    path = write_report(report, folder)
    # the first failing op calls, saved with a script each under folder/repro/ (parity repro); before write_folder,
    # whose pages list them
    captures = kept.pop("captures", None)
    repros = [] if captures is None else write_kernel_repros(report, folder, case=spec, captures=captures)
    del captures
    page = write_folder(folder, report.to_dict(), invocation)
    if as_json:
        out.print_json(json.dumps(report.to_dict()))
    else:
        render(report)
        if report.location:
            out.print(f"[red]first divergence[/red]: {escape(report.location)}")
        if report.bisect is not None:
            b = report.bisect
            for line in b["log"]:
                out.print(f"active bisect {escape(line)}")
            out.print(
                f"active bisect: {b['replays']} replays (bound ceil(log2 L) + 2 = {b['bound']})"
                + (f", first bad layer {b['layer']} ({b['submodule']})" if b["layer"] is not None else "")
            )
        out.print(f"checkpoint: {ckpt}\nreport: {page} ({path.name}, summary.json, report.md, metrics.csv, repro.sh)"
                  + (f"\ndumps: {dump_dir}" if dump_dir else "")
                  + (f"\nkernel repros: {len(repros)}, run them: parity repro {folder}" if repros else ""))  # fmt: skip
    status = "PASSED" if report.passed else "FAILED"
    # with --json, stdout holds only the JSON document; the one-line summary goes to stderr
    (err if as_json else out).print(f"{status} | {spec.name} | {report.wall_s:.1f}s | parity run {case}")
    if not report.passed:
        raise typer.Exit(EXIT_FAIL)


def register(app: typer.Typer) -> None:
    app.command("run")(run)

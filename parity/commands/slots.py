"""`parity slot-invariance DIR`: does any layer's output depend on the batch slot a sequence sits in?"""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import Output, load, output_options, progress, table

LAYERS = {
    "status": "",
    "phase": "phase",
    "step": "step",
    "block": "layer block",
    "rank": "rank",
    "compared": "slot pairs",
    "slots_differ": "slots that differ",
    "max_abs": "max abs",
    "first_failure": "first differing record",
}

Solo = Annotated[
    list[Path] | None,
    typer.Option("--solo", help="Dump dir of a solo run of some request (repeatable); slots are compared with it."),
]


@opt.with_groups(output=output_options("slot-invariance"))
def slot_invariance_command(
    dump_dir: opt.DumpDir,
    solo: Solo = None,
    min_cos: opt.MinCos = None,
    atol: opt.Atol = None,
    rtol: opt.Rtol = 0.0,
    output: Output = None,
    limit: opt.Limit = 0,
) -> None:
    """Compare every slot that holds the same request with the first such slot (and with --solo runs).

    Slots are cut with the seq layout the run tagged (cu_seqlens or batch) and matched by request id; without ids
    every slot is assumed to hold the same sequence. Exact (bitwise) by default; --min-cos / --atol relax it.
    Exit 1 if any slot differs; the first differing layer is named.
    """
    # `parity.compare` loads when the command runs, not when the CLI starts (every command module is imported then)
    from parity.compare import Thresholds, layer_summary, slot_invariance
    from parity.compare.report import frame

    exact = min_cos is None and atol is None
    thresholds = Thresholds(exact=exact, min_cos=min_cos, max_norm_dev=None, atol=atol, rtol=rtol)
    dump = load(dump_dir, "dump")
    solos = [load(s, f"solo {s}") for s in solo or ()]
    with progress("comparing slots") as on_progress:
        report = slot_invariance(dump, solos, thresholds=thresholds, on_progress=on_progress)
    layers = frame(layer_summary(report))
    rows = frame(r.to_row() for r in report.rows)
    first = report.first
    if output.terminal:
        out.print(table(f"parity slot-invariance {dump_dir}", layers, LAYERS, limit))
        if report.assumed_same:
            out.print("[yellow]no request ids recorded: every slot is assumed to hold the same sequence[/yellow]")
        if first is not None:
            r = first.record
            where = f"phase {r.phase}, step {r.step}, layer {r.layer}, record {r.name}"
            what = f"slot {first.slot} vs {first.against}: {'; '.join(first.reasons)}"
            out.print(f"[red]first slot divergence[/red]: {escape(where)}: {escape(what)}", markup=True)
    failed = sum(not r.passed for r in report.rows)
    summary = {
        "dir": str(dump_dir),
        "compared": len(report.rows),
        "differ": failed,
        "skipped": report.skipped,
        "first": None if first is None else first.to_row(),
    }
    detail = f"{failed} of {len(report.rows)} slot comparisons differ ({report.skipped} records without slots)"
    output.finish(report.passed, summary, rows, detail, layers=layers)


def register(app: typer.Typer) -> None:
    app.command("slot-invariance")(slot_invariance_command)

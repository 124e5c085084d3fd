"""`parity bisect A B`: the first record where two dumps diverge, in execution order, and the per-layer curve."""

from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import Output, load_and_compare, output_options, table

# `parity.compare` loads when the command runs, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.compare import PairResult, Selection, Thresholds
    from parity.compare.report import Frame

CURVE = {
    "status": "",
    "phase": "phase",
    "step": "step",
    "block": "layer block",
    "records": "records",
    "failed": "failed",
    "min_cos": "min cos",
    "max_rel_diff": "max rel diff",
    "max_norm_dev": "max norm dev",
    "first_failure": "first failing record",
}


@opt.measuring(output_options("bisect"))
def bisect_command(
    dumps: opt.DumpPair = None,
    thresholds: "Thresholds" = None,
    select: "Selection" = None,
    allow_missing: opt.AllowMissing = None,
    output: Output = None,
    limit: Annotated[
        int,
        typer.Option(
            "--limit", min=0, help="Most curve rows in the terminal table, ending at the first failing one (0: all)."
        ),
    ] = 100,
    full_curve: Annotated[
        bool,
        typer.Option("--curve", help="Measure every record for the whole curve (default: stop at the first failure)."),
    ] = False,
    data: dict = None,
) -> None:
    """Name the first record (phase, step, layer, module) where B diverges from A; exit 1 if there is one.

    Walks the aligned activation records in A's execution order (phase, step, layer, sub-module) and stops at the
    first one that crosses the thresholds (default: cos < 0.999 or norm ratio off by more than 1 %). Records after
    it are not read unless --curve asks for the whole per-layer curve; weights are not read.
    """
    from parity.compare import bisect
    from parity.compare.report import frame

    results = load_and_compare(
        dumps,
        thresholds=thresholds,
        select=select,
        allow_missing=allow_missing,
        stop_at_first_failure=not full_curve,
        kinds=frozenset({"activation"}),
        **data,
    )
    report = bisect(results)
    curve = frame(p.to_row() for p in report.curve)
    first = None if report.first is None else report.first.to_row()
    unmatched = [r.to_row() for r in report.unmatched if not r.passed]
    if output.terminal:
        shown, hidden = window(curve, limit)
        title = f"parity bisect {dumps.a} {dumps.b}: per-layer curve"
        if hidden:
            title += f" (the {len(shown)} rows up to the first failure; {hidden} more hidden: --limit 0 shows all)"
        out.print(table(title, shown, CURVE))
        out.print(verdict(report.first), markup=True)
        if unmatched:
            example = escape(unmatched[0]["name"])
            out.print(f"[red]{len(unmatched)} record(s) missing on one side[/red], e.g. {example}")
    summary = {"a": str(dumps.a), "b": str(dumps.b), "records": sum(p.records for p in report.curve), "first": first}
    summary["curve"] = "full" if full_curve or report.first is None else "up to the first divergence (--curve: full)"
    detail = "no divergence" if report.first is None else _where(report.first)
    output.finish(report.passed, summary, curve, detail, unmatched=unmatched)


def window(curve: "Frame", limit: int) -> tuple["Frame", int]:
    """The terminal's view of the curve: at most `limit` rows ending at the first failing one (the layers leading
    into the divergence; the curve's end when none fails), and how many rows it leaves out. A curve has a row per
    (phase, step, layer block): tens of thousands for a long run, which the terminal table would take minutes to
    lay out. The JSON and HTML reports keep every row."""
    from parity.compare.report import Frame

    if not limit or len(curve) <= limit:
        return curve, 0
    first = next((i for i, row in enumerate(curve.rows) if row["status"] != "pass"), len(curve) - 1)
    start = max(0, first + 1 - limit)
    return Frame(curve.rows[start : start + limit]), len(curve) - limit


def verdict(first: "PairResult | None") -> str:
    if first is None:
        return "[green]no divergence[/green]: every aligned record passes"
    return f"[red]first divergence[/red]: {escape(_where(first))}: {escape('; '.join(first.reasons))}"


def _where(r: "PairResult") -> str:
    rec = r.record
    return f"phase {rec.phase}, step {rec.step}, layer {rec.layer}, module {rec.module or '(root)'}, record {r.name}"


def register(app: typer.Typer) -> None:
    app.command("bisect")(bisect_command)

"""`parity compare A B`: every aligned record of two dumps, measured in float64 and judged against thresholds."""

from dataclasses import replace
from typing import TYPE_CHECKING

import typer

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import PAIR_COLUMNS, Output, load_and_compare, output_options, table

# `parity.compare` loads when the command runs, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.compare import Selection, Thresholds


@opt.measuring(output_options("compare"))
def compare(
    dumps: opt.DumpPair = None,
    thresholds: "Thresholds" = None,
    logits: opt.Logits = None,
    top_k: opt.TopK = 5,
    min_top1: opt.MinTop1 = None,
    max_kl: opt.MaxKl = None,
    select: "Selection" = None,
    allow_missing: opt.AllowMissing = None,
    output: Output = None,
    limit: opt.Limit = 100,
    data: dict = None,
) -> None:
    """Compare two dumps record by record; exit 1 if any record fails its thresholds or is missing on one side."""
    from parity.compare.report import frame

    thresholds = replace(thresholds, min_top1=min_top1, max_kl=max_kl)
    results = load_and_compare(
        dumps,
        thresholds=thresholds,
        select=select,
        logits=logits,
        top_k=top_k,
        allow_missing=allow_missing,
        **data,
    )
    rows = frame(r.to_row() for r in results)
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    summary = {
        "a": str(dumps.a),
        "b": str(dumps.b),
        "pairs": len(results),
        **counts,
        "missing_in_a": sum(r.missing == "a" for r in results),
        "missing_in_b": sum(r.missing == "b" for r in results),
    }
    if output.terminal:
        out.print(table(f"parity compare {dumps.a} {dumps.b}", rows, PAIR_COLUMNS, limit))
    passed = counts["fail"] == 0
    detail = f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip of {len(results)} records"
    output.finish(passed, summary, rows, detail)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)

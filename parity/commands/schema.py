"""`parity schema A B`: do two dumps hold the same records (names, shapes, dtypes, tags)?"""

from typing import TYPE_CHECKING

import typer

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import Output, load, output_options, table

# `parity.compare` loads when the command runs, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.compare import Selection

COLUMNS = {
    "status": "",
    "issue": "issue",
    "name": "record",
    "a": "a",
    "b": "b",
    "records": "records",
    "phases": "phases:steps",
}


@opt.with_groups(dumps=opt.dumps, select=opt.selection, output=output_options("schema"))
def schema(
    dumps: opt.DumpPair = None,
    select: "Selection" = None,
    output: Output = None,
    limit: opt.Limit = 100,
) -> None:
    """Diff the record sets of two dumps before comparing numbers; exit 1 on any difference.

    Reports records only in A or only in B, and aligned records whose shape, dtype or layer id differ. A shape
    difference that the seq layouts reconcile ([b, s, ...] vs flat [T, ...]) is a note, not a failure.
    """
    from parity.compare import schema_diff
    from parity.compare.report import frame

    da, db = load(dumps.a, "a"), load(dumps.b, "b")
    rows = schema_diff(da, db, dumps.name_map(), select)
    diffs = frame(r.to_row() for r in rows)
    failing = sum(len(r.records) for r in rows if r.fails)
    notes = sum(len(r.records) for r in rows if not r.fails)
    if output.terminal:
        if rows:
            out.print(table(f"parity schema {dumps.a} {dumps.b}", diffs, COLUMNS, limit))
        else:
            out.print("[green]same records[/green] on both sides", markup=True)
    summary = {
        "a": str(dumps.a),
        "b": str(dumps.b),
        "records_a": len(da.records),
        "records_b": len(db.records),
        "differences": failing,
        "notes": notes,
    }
    detail = f"{failing} record(s) differ, {notes} note(s); {len(da.records)} vs {len(db.records)} records"
    output.finish(failing == 0, summary, diffs, detail)


def register(app: typer.Typer) -> None:
    app.command("schema")(schema)

"""`parity dump-info DIR`: what a dump holds, after checking every manifest line and tensor file."""

import typer

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import Output, load, output_options, table

COLUMNS = {
    "kind": "kind",
    "name": "record",
    "layer": "layer",
    "class": "class",
    "dtype": "dtype",
    "shape": "shape",
    "records": "records",
    "phases": "phases:steps",
    "mode": "mode",
}


@opt.with_groups(output=output_options("dump-info"))
def dump_info(dump_dir: opt.DumpDir, output: Output = None, limit: opt.Limit = 0) -> None:
    """Summarise a dump dir (records, runs, ranks, phases, steps, bytes) and list its tensors by name.

    Every manifest line and every tensor file header is checked first: a bad dump exits 2 with one line naming
    the file, line and field.
    """
    # `parity.compare` loads when the command runs, not when the CLI starts (every command module is imported then)
    from parity.compare.info import dump_summary, name_table
    from parity.compare.report import frame

    dump = load(dump_dir, "dump")
    summary = dump_summary(dump)
    names = frame(name_table(dump))
    if output.terminal:
        out.print(table(f"parity dump-info {dump_dir}", names, COLUMNS, limit))
        for key, value in summary.items():
            out.print(f"{key:>12}: {value}", markup=False)
    detail = f"{summary['records']} records, {summary['names']} names, {summary['tensor_bytes'] / 2**20:.1f} MiB"
    output.finish(True, summary, names, detail)


def register(app: typer.Typer) -> None:
    app.command("dump-info")(dump_info)

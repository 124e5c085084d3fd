"""`parity compare A B`: every aligned record of two dumps, measured in float64 and judged against thresholds."""

import os
from dataclasses import replace
from typing import Annotated

import torch
import typer

from parity.commands import _diff_options as opt
from parity.commands._common import out
from parity.commands._diff_render import Output, load_and_compare, output_options, table
from parity.compare import Selection, Thresholds
from parity.compare.report import frame
from parity.errors import ParityError

# the data-path options of `compare` and `bisect` (defined here, used by both)
Threads = Annotated[
    int | None, typer.Option("--threads", help="Records measured at once (default: the usable cores, at most 4).")
]
# --device cuda is written for a GPU box and verified there by the coordinator only (no GPU on the dev machine)
Device = Annotated[
    str, typer.Option("--device", help="Where the float64 metrics run: cpu, or cuda when a GPU is here.")
]


def data_path(threads: Threads = None, device: Device = "cpu") -> dict:
    """The data-path option group: `--threads` / `--device` checked and turned into `compare_dumps` arguments."""
    if threads is not None and threads < 1:
        raise ParityError(f"--threads {threads}: expected a count >= 1")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ParityError(f"--device {device!r}: expected cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParityError(f"--device {device!r}: expected cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParityError(f"--device {device}: no CUDA GPU is visible to torch here")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"threads": threads or min(4, usable), "device": str(dev)}


COLUMNS = {
    "status": "",
    "phase": "phase",
    "step": "step",
    "layer": "layer",
    "name": "record",
    "shape_a": "shape",
    "cos": "cos",
    "max_abs": "max abs",
    "rel_diff": "rel diff",
    "norm_ratio": "norm ratio",
    "worst_token": "worst token",
    "reasons": "why",
}


@opt.with_groups(thresholds=opt.thresholds, select=opt.selection, output=output_options("compare"), data=data_path)
def compare(
    a: opt.DumpA,
    b: opt.DumpB,
    map_file: opt.MapFile = None,
    thresholds: Thresholds = None,
    logits: opt.Logits = None,
    top_k: opt.TopK = 5,
    min_top1: opt.MinTop1 = None,
    max_kl: opt.MaxKl = None,
    select: Selection = None,
    allow_missing: opt.AllowMissing = None,
    output: Output = None,
    limit: opt.Limit = 100,
    data: dict = None,
) -> None:
    """Compare two dumps record by record; exit 1 if any record fails its thresholds or is missing on one side."""
    thresholds = replace(thresholds, min_top1=min_top1, max_kl=max_kl)
    results = load_and_compare(
        a,
        b,
        name_map=opt.name_map(map_file),
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
        "a": str(a),
        "b": str(b),
        "pairs": len(results),
        **counts,
        "missing_in_a": sum(r.missing == "a" for r in results),
        "missing_in_b": sum(r.missing == "b" for r in results),
    }
    if output.terminal:
        out.print(table(f"parity compare {a} {b}", rows, COLUMNS, limit))
    passed = counts["fail"] == 0
    detail = f"{counts['pass']} pass, {counts['fail']} fail, {counts['skip']} skip of {len(results)} records"
    output.finish(passed, summary, rows, detail)


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)

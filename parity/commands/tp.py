"""`parity tp`: a case's workload on the optimized model at tensor-parallel world size N (N processes), forced with
the one-process run and compared with it record by record under the TP gate (docs/optimized.md)."""

from pathlib import Path
from typing import Annotated

import typer

from parity.capture.tp import check_dirs, check_tp, gate
from parity.cases import load_case
from parity.commands import _diff_options as opt
from parity.commands._common import check_device, out
from parity.commands._diff_render import Output, table
from parity.commands.compare import COLUMNS
from parity.compare.report import frame
from parity.errors import ParityError
from parity.optimized import parallel
from parity.run import prepare_checkpoint, run_inputs


def tp(
    case: Annotated[str | None, typer.Argument(help="Built-in case name or a .toml file (default: tiny).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the dumps go (one/, tp/); new or empty.")] = Path("tp"),
    world_size: Annotated[int, typer.Option("--world-size", help="Ranks (processes).")] = 2,
    backend: Annotated[str, typer.Option(help="gloo (CPU) or nccl (CUDA, NCCL_NVLS_ENABLE=0).")] = "gloo",
    device: Annotated[str, typer.Option(help="cpu, or cuda (rank r runs on cuda:r).")] = "cpu",
    checkpoint: Annotated[Path | None, typer.Option(help="Use this checkpoint (default: the case's).")] = None,
    plant_offset: Annotated[
        str | None, typer.Option(help="Plant a bug: RANK:PARAM_REGEX:ROWS shifts that rank's weight slices.")
    ] = None,
    json: opt.Json = False,
    limit: opt.Limit = 20,
) -> None:
    """Run the case at TP world size N and compare the merged rank dumps with the one-process run; exit 1 if any
    record is outside the gate. MTP drafting is off (rows of rejected drafts are never forced)."""
    output = Output("tp", json, False, None)
    check_device(device)
    if world_size < 2:
        raise ParityError(f"--world-size {world_size}: expected >= 2")
    offset = _offset(plant_offset)
    check_dirs(out_dir, offset is not None)
    parallel.check_backend(backend, device)
    loaded = load_case(case)
    inp = run_inputs(loaded, prepare_checkpoint(loaded, checkpoint, out_dir), device)
    results, one_dir, tp_dir = check_tp(inp, world_size, out_dir, backend=backend, offset=offset)
    rows = frame(r.to_row() for r in results)
    failed = [r for r in results if not r.passed]
    summary = {"one": str(one_dir), "tp": str(tp_dir), "world_size": world_size, "backend": backend}
    g = gate(world_size)
    summary |= {"pairs": len(results), "fail": len(failed), "min_cos": g.min_cos, "max_norm_dev": g.max_norm_dev}
    if output.terminal:
        out.print(table(f"parity tp: {one_dir} vs {tp_dir} (world size {world_size})", rows, COLUMNS, limit))
        if failed:
            first = min(failed, key=lambda r: r.order).record
            out.print(f"first divergence: {first.name} (phase {first.phase}, step {first.step}, layer {first.layer})")
    detail = f"{len(results) - len(failed)} pass, {len(failed)} fail of {len(results)} records"
    output.finish(not failed, summary, rows, detail)


def _offset(text: str | None) -> tuple[int, str, int] | None:
    if text is None:
        return None
    rank, _, rest = text.partition(":")
    regex, _, rows = rest.rpartition(":")
    try:
        return int(rank), regex, int(rows)
    except ValueError:
        raise ParityError(f"--plant-offset {text!r}: expected RANK:PARAM_REGEX:ROWS, e.g. 1:wq_b:-1") from None


def register(app: typer.Typer) -> None:
    app.command("tp")(tp)

"""`parity tp`: a case's workload on the optimized model at tensor-parallel world size N (N processes), forced with
the one-process run and compared with it record by record under the TP gate (docs/optimized.md)."""

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer

from parity.commands import _diff_options as opt
from parity.commands._common import check_device, out
from parity.commands._diff_render import PAIR_COLUMNS, Output, table
from parity.errors import ParityError
from parity.io import check_output_dir
from parity.optimized import parallel

# the capture, engine and compare modules load when the command runs, not when the CLI starts (every command module
# is imported then)
if TYPE_CHECKING:
    from parity.config import ModelArgs


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
    from parity.capture.tp import check_dirs, check_tp, gate
    from parity.cases import load_case
    from parity.compare.report import frame
    from parity.run import prepare_checkpoint, run_inputs

    output = Output("tp", json, False, None)
    check_device(device)
    if world_size < 2:
        raise ParityError(f"--world-size {world_size}: expected >= 2")
    if device.startswith("cuda") and world_size > torch.cuda.device_count():
        raise ParityError(f"--world-size {world_size}: one GPU per rank, this machine has {torch.cuda.device_count()}")
    offset = _offset(plant_offset, world_size)
    check_output_dir(out_dir, "--out")
    check_dirs(out_dir, offset is not None)
    parallel.check_backend(backend, device)
    loaded = load_case(case)
    _check_split(loaded.model_args(), world_size)  # before the checkpoint is written and any process starts
    ckpt = prepare_checkpoint(loaded, checkpoint, out_dir)
    _check_shards(ckpt, world_size, offset, plant_offset)
    inp = run_inputs(loaded, ckpt, device)
    results, one_dir, tp_dir = check_tp(inp, world_size, out_dir, backend=backend, offset=offset)
    rows = frame(r.to_row() for r in results)
    failed = [r for r in results if not r.passed]
    summary = {"one": str(one_dir), "tp": str(tp_dir), "world_size": world_size, "backend": backend}
    g = gate(world_size)
    summary |= {"pairs": len(results), "fail": len(failed), "min_cos": g.min_cos, "max_norm_dev": g.max_norm_dev}
    if output.terminal:
        out.print(table(f"parity tp: {one_dir} vs {tp_dir} (world size {world_size})", rows, PAIR_COLUMNS, limit))
        if failed:
            first = min(failed, key=lambda r: r.order).record
            out.print(f"first divergence: {first.name} (phase {first.phase}, step {first.step}, layer {first.layer})")
    detail = f"{len(results) - len(failed)} pass, {len(failed)} fail of {len(results)} records"
    output.finish(not failed, summary, rows, detail)


def _offset(text: str | None, world: int) -> tuple[int, str, int] | None:
    """RANK:PARAM_REGEX:ROWS, each part checked: a rank of the world, a valid regex, a non-zero shift."""
    if text is None:
        return None
    rank, _, rest = text.partition(":")
    regex, _, rows = rest.rpartition(":")
    try:
        parsed = int(rank), regex, int(rows)
    except ValueError:
        raise ParityError(f"--plant-offset {text!r}: expected RANK:PARAM_REGEX:ROWS, e.g. 1:wq_b:-1") from None
    if not 0 <= parsed[0] < world:
        raise ParityError(
            f"--plant-offset {text!r}: rank {parsed[0]} is not a rank of world size {world} (0..{world - 1})"
        )
    try:
        re.compile(regex)
    except re.error as e:
        raise ParityError(f"--plant-offset {text!r}: {regex!r} is not a valid regex ({e})") from None
    if not regex or parsed[2] == 0:
        raise ParityError(
            f"--plant-offset {text!r}: expected a parameter regex and a non-zero row shift (it plants nothing)"
        )
    return parsed


def _check_split(args: "ModelArgs", world: int) -> None:
    """The counts the ranks split (heads, output groups, indexer heads, routed experts, the vocabulary) must divide
    by the world size, as the official convert.py asserts: refused here, not inside N freshly started processes."""
    counts = {"n_heads": args.n_heads, "o_groups": args.o_groups, "n_routed_experts": args.n_routed_experts,
              "vocab_size": args.vocab_size}  # fmt: skip
    if 4 in args.compress_ratios:  # ratio-4 layers carry the indexer, whose heads are split too
        counts["index_n_heads"] = args.index_n_heads
    bad = next((k for k, n in counts.items() if n % world), None)
    if bad is not None:
        raise ParityError(
            f"--world-size {world}: the model's {bad} = {counts[bad]} is not divisible by it (ranks split it evenly)"
        )


def _check_shards(ckpt: Path, world: int, offset: tuple[int, str, int] | None, text: str | None) -> None:
    """Every tensor the ranks cut (`parallel.SPLIT`) divides into `world` slices, and a planted offset matches some
    of them and keeps its slice inside each (read from the shard headers, no weights loaded)."""
    from parity.checkpoint import Checkpoint

    c = Checkpoint(ckpt)
    hit = []
    for name in c.weight_map:
        dim = parallel.split_dim(name)
        if dim is None:
            continue
        shape = c.header_shape(name)
        if shape[dim] % world:
            raise ParityError(f"--world-size {world}: {ckpt}: tensor {name!r} dim {dim} is {shape[dim]}, not divisible")
        if offset is not None and re.search(offset[1], name):
            size = shape[dim] // world
            start = offset[0] * size + offset[2]
            if not 0 <= start <= shape[dim] - size:
                raise ParityError(
                    f"--plant-offset {text!r}: {name} slice of rank {offset[0]} would start at row {start}, outside "
                    f"its {shape[dim]} rows"
                )
            hit.append(name)
    c.close()
    if offset is not None and not hit:
        raise ParityError(
            f"--plant-offset {text!r}: {offset[1]!r} matches no tensor the ranks split (wq_b, wo_a, wo_b, attn_sink, "
            "embed, head, indexer wq_b / weights_proj): it plants nothing"
        )


def register(app: typer.Typer) -> None:
    app.command("tp")(tp)

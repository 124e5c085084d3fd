"""Options shared by the dump-reading commands (`compare`, `bisect`, `slot-invariance`, `schema`, `dump-info`),
defined once as `Annotated` aliases, and grouped: a group is a function whose parameters are the options and whose
result is the package object they make (`dumps`, `thresholds`, `selection`). `@with_groups(thresholds=thresholds)`
puts the group's options into a command's signature in place of its `thresholds` parameter and hands the command the
result, so a group's option list is written once whichever commands take it."""

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
import typer

from parity.dump import PHASES
from parity.dump.config import Ranges
from parity.errors import ParityError

# `parity.compare` loads when a command reads dumps, not when the CLI starts (every command module is imported then)
if TYPE_CHECKING:
    from parity.compare import NameMap, Selection, Thresholds

DumpDir = Annotated[Path, typer.Argument(help="A dump dir (holds manifest.jsonl, or rank*/manifest.jsonl).")]
DumpA = Annotated[Path, typer.Argument(help="Reference dump dir (side a).")]
DumpB = Annotated[Path, typer.Argument(help="Candidate dump dir (side b).")]

MapFile = Annotated[Path | None, typer.Option("--map", help="TOML name map: renames, ignores, shard rules.")]
Json = Annotated[bool, typer.Option("--json", help="Write a JSON report (stdout, or --out).")]
Csv = Annotated[bool, typer.Option("--csv", help="Write the table as CSV (stdout, or --out).")]
Out = Annotated[Path | None, typer.Option("--out", help="Write the JSON/CSV report to this file (atomically).")]
Limit = Annotated[int, typer.Option("--limit", min=0, help="Most rows in the terminal table (0: all); failures first.")]

MinCos = Annotated[float | None, typer.Option("--min-cos", help="Lowest cosine that passes.")]
MaxNormDev = Annotated[float | None, typer.Option("--max-norm-dev", help="Largest |norm(b)/norm(a) - 1|.")]
MaxRelDiff = Annotated[float | None, typer.Option("--max-rel-diff", help="Largest 1 - 2Σab/Σ(a²+b²).")]
Atol = Annotated[float | None, typer.Option("--atol", help="Gate: no element beyond atol + rtol*|a|.")]
Rtol = Annotated[float, typer.Option("--rtol", help="Relative part of the --atol gate.")]
MinTokenCos = Annotated[float | None, typer.Option("--min-token-cos", help="Lowest per-token cosine.")]
Exact = Annotated[bool, typer.Option("--exact", help="Require bitwise equality everywhere.")]
AllowDtypeChange = Annotated[
    bool, typer.Option("--allow-dtype-change", help="Measure records whose dtype differs (else they fail).")
]

Logits = Annotated[str | None, typer.Option("--logits", help="Regex of records that hold logits [..., vocab].")]
TopK = Annotated[int, typer.Option("--top-k", min=1, help="k of the logits top-k overlap.")]
MinTop1 = Annotated[float | None, typer.Option("--min-top1", help="Lowest logits argmax agreement.")]
MaxKl = Annotated[float | None, typer.Option("--max-kl", help="Largest mean logits KL(a || b).")]

Phase = Annotated[list[str] | None, typer.Option("--phase", help=f"Only these phases ({', '.join(PHASES)}).")]
Steps = Annotated[str | None, typer.Option("--steps", help="Only these steps, e.g. 0-3,7.")]
Layers = Annotated[str | None, typer.Option("--layers", help="Only these layer ids, e.g. 0-3,7.")]
Name = Annotated[str | None, typer.Option("--name", help="Only records whose name matches this regex.")]
AllowMissing = Annotated[
    str | None, typer.Option("--allow-missing", help="Regex of names that may be missing on one side.")
]

# the data path of the commands that measure (`compare`, `bisect`)
Threads = Annotated[
    int | None, typer.Option("--threads", help="Records measured at once (default: the usable cores, at most 4).")
]
# --device cuda is written for a GPU box and verified there by the coordinator only (no GPU on the dev machine)
Device = Annotated[
    str, typer.Option("--device", help="Where the float64 metrics run: cpu, or cuda when a GPU is here.")
]


def thresholds(
    min_cos: MinCos = None,
    max_norm_dev: MaxNormDev = None,
    max_rel_diff: MaxRelDiff = None,
    atol: Atol = None,
    rtol: Rtol = 0.0,
    min_token_cos: MinTokenCos = None,
    exact: Exact = False,
    allow_dtype_change: AllowDtypeChange = False,
) -> "Thresholds":
    """The record gates. Unset options keep the package defaults (cos >= 0.999, norm ratio within 1 %);
    non-finite or out-of-range values are refused by `Thresholds` itself."""
    from parity.compare import Thresholds

    default = Thresholds()
    return Thresholds(
        min_cos=default.min_cos if min_cos is None else min_cos,
        max_norm_dev=default.max_norm_dev if max_norm_dev is None else max_norm_dev,
        max_rel_diff=max_rel_diff,
        atol=atol,
        rtol=rtol,
        min_token_cos=min_token_cos,
        exact=exact,
        allow_dtype_change=allow_dtype_change,
    )


def selection(phase: Phase = None, steps: Steps = None, layers: Layers = None, name: Name = None) -> "Selection":
    """Which records are compared."""
    from parity.compare import Selection

    unknown = sorted(set(phase or ()) - set(PHASES))
    if unknown:
        raise ParityError(f"--phase {', '.join(unknown)}: not a phase; use {', '.join(PHASES)}")
    return Selection(
        phases=frozenset(phase) if phase else None,
        steps=None if steps is None else Ranges.parse(steps, "--steps"),
        layers=None if layers is None else Ranges.parse(layers, "--layers"),
        name=name,
    )


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


@dataclass(frozen=True)
class DumpPair:
    """The two dumps a command reads side by side, and the name map file that aligns them."""

    a: Path
    b: Path
    map_file: Path | None

    def name_map(self) -> "NameMap | None":
        """The name map, read when the command asks for it (after its other options are checked)."""
        from parity.compare import NameMap

        return None if self.map_file is None else NameMap.load(self.map_file)


def dumps(a: DumpA, b: DumpB, map_file: MapFile = None) -> DumpPair:
    """Side a, side b and their name map (`compare`, `bisect`, `schema`)."""
    return DumpPair(a, b, map_file)


def with_groups(**groups: Callable) -> Callable:
    """Replace each command parameter named in `groups` by that group function's parameters (its options) in the
    signature typer reads; the command receives the group's result under the parameter's name."""

    def wrap(command: Callable) -> Callable:
        members = {key: list(inspect.signature(build).parameters) for key, build in groups.items()}
        params = []
        for p in inspect.signature(command).parameters.values():
            params.extend(inspect.signature(groups[p.name]).parameters.values() if p.name in groups else [p])

        @functools.wraps(command)
        def run(**kwargs):
            for key, build in groups.items():
                kwargs[key] = build(**{name: kwargs.pop(name) for name in members[key]})
            return command(**kwargs)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return wrap


def measuring(output: Callable) -> Callable:
    """The option groups of the commands that measure two dumps record by record (`compare`, `bisect`), in their
    order on the command line: the dumps and name map, the thresholds, the selection, `output` (the command's
    `_diff_render.output_options`), the data path; a command's own options stand between them in its signature."""
    return with_groups(dumps=dumps, thresholds=thresholds, select=selection, output=output, data=data_path)

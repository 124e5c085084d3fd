"""Options shared by the dump-reading commands (`compare`, `bisect`, `slot-invariance`, `schema`, `dump-info`),
defined once as `Annotated` aliases, plus the helpers that turn them into package objects."""

from pathlib import Path
from typing import Annotated

import typer

from parity.compare import NameMap, Selection, Thresholds
from parity.dump import PHASES
from parity.dump.config import Ranges
from parity.errors import ParityError

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


def thresholds(
    min_cos: float | None,
    max_norm_dev: float | None,
    max_rel_diff: float | None,
    atol: float | None,
    rtol: float,
    min_token_cos: float | None,
    exact: bool,
    **more,
) -> Thresholds:
    """Unset options keep the package defaults (cos >= 0.999, norm ratio within 1 %); `more`: the logit gates and
    `allow_dtype_change`. Non-finite or out-of-range values are refused by `Thresholds` itself."""
    default = Thresholds()
    return Thresholds(
        min_cos=default.min_cos if min_cos is None else min_cos,
        max_norm_dev=default.max_norm_dev if max_norm_dev is None else max_norm_dev,
        max_rel_diff=max_rel_diff,
        atol=atol,
        rtol=rtol,
        min_token_cos=min_token_cos,
        exact=exact,
        **more,
    )


def selection(phase: list[str] | None, steps: str | None, layers: str | None, name: str | None) -> Selection:
    unknown = sorted(set(phase or ()) - set(PHASES))
    if unknown:
        raise ParityError(f"--phase {', '.join(unknown)}: not a phase; use {', '.join(PHASES)}")
    return Selection(
        phases=frozenset(phase) if phase else None,
        steps=None if steps is None else Ranges.parse(steps, "--steps"),
        layers=None if layers is None else Ranges.parse(layers, "--layers"),
        name=name,
    )


def name_map(path: Path | None) -> NameMap | None:
    return None if path is None else NameMap.load(path)

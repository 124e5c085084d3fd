"""The optimized engine at tensor-parallel world size W: W processes (one rank each, `optimized.parallel`), each
capturing its taps like `runs.engine_capture` and writing them to `<out>/rank<r>/`, the layout `parity compare`
merges back into logical tensors (each record declares its rule: `replicated`, or `cat:1` for the split query
heads and o-LoRA groups).

`force` (a dump dir of a one-rank run of the same workload) teacher-forces every replicated tap of every rank with
that run's values at the same (request, position), so each site then differs from the one-rank run only by its
own TP error (the reduction order of its all-reduces), never by error carried from upstream. Split taps are not
forced: a rank holds a slice of them.
"""

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch.multiprocessing.spawn import ProcessRaisedException

from parity.capture import forcing
from parity.capture.runs import RunInputs, Targets, engine_capture, targets
from parity.compare.diff import PairResult, compare_dumps
from parity.compare.gate import Thresholds
from parity.compare.loader import load_dump
from parity.compare.rows import RowStore
from parity.compare.sites import SitePath
from parity.dump.writer import save_records
from parity.errors import ParityError
from parity.optimized import parallel

# the taps a rank holds a slice of (declared `cat:1` in optimized/model.py): never forced with whole tensors
SPLIT_SITES = ("attn.q", "attn.o_lora")

# The gate of a forced TP run against the one-rank run, anchored on float64 math. TP changes the rounding of sums
# only, and on a row-parallel output (wo_b) most: one rank rounds the exact sum S to bf16 once (error <= u|S|,
# u = 2^-8); W ranks round their partial sums S_r to bf16, add them in fp32 and round again (<= u sum|S_r| + u|S|).
# The two differ by at most u sum|S_r| + 2u|S| per element, in a record's L2 norm u sum||S_r|| / ||S|| + 2u of
# ||S||: about (sqrt(W) + 2)u for partials over independent slices of the input, 3.4u at W = 2. The gate allows
# ceil(sqrt(W) + 2)u, at least 4u = 2^-6 (cos >= 1 - eps^2 / 2, norm within eps); tests/tp checks the elementwise
# bound on exact float64 sums at W = 2. Not covered: top-k choices that a rounding flips (indexer entries past
# index_topk, expert near-ties), which no float gate bounds.
BF16_U = 2.0**-8


def gate_eps(world: int) -> float:
    return max(4, math.ceil(math.sqrt(world) + 2)) * BF16_U


def gate(world: int) -> Thresholds:
    eps = gate_eps(world)
    return Thresholds(min_cos=1 - eps**2 / 2, max_norm_dev=eps)


GATE_EPS = gate_eps(2)
GATE = gate(2)


def replicated(sp: SitePath) -> bool:
    return forcing.everything(sp) and sp.site.name not in SPLIT_SITES


def tp_capture(
    inp: RunInputs,
    tg: Targets,
    world: int,
    outs: Sequence[str | Path | tuple[str | Path, tuple[int, str, int] | None]],
    *,
    backend: str = "gloo",
    force: str | Path | None = None,
) -> list[Path]:
    """Run `inp`'s workload on the engine at TP world size `world` once per entry of `outs` (a dump dir, or a pair
    (dir, offset) where `offset` plants a shard-offset bug, `parallel.TP.offset`, for the harness's own tests), all
    in the same `world` processes (one start-up), and dump every rank's taps under each dir."""
    jobs = [(Path(o), None) if isinstance(o, (str, Path)) else (Path(o[0]), o[1]) for o in outs]
    for out, _ in jobs:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ParityError(f"{out}: not an empty dir; each TP dump needs one")
    if force is not None:
        load_dump(force)  # a bad forcing dump is refused here, once, before any process starts
    jobs = [(str(out), offset) for out, offset in jobs]
    try:
        parallel.spawn(_rank, world, backend, inp, tg, jobs, None if force is None else str(force), device=inp.device)
    except ProcessRaisedException as e:
        # a rank refused its input (a ParityError): the same one line as in one process, not the rank's traceback
        last = str(e).strip().splitlines()[-1]
        prefix = f"{ParityError.__module__}.{ParityError.__name__}: "
        if not last.startswith(prefix):
            raise
        raise ParityError(f"tensor parallel world size {world}: {last.removeprefix(prefix)}") from None
    return [Path(out) for out, _ in jobs]


def _rank(tp: parallel.TP, inp: RunInputs, tg: Targets, jobs: list, force: str | None) -> None:
    if inp.device.startswith("cuda"):
        inp = replace(inp, device=f"cuda:{tp.rank}")
    store = None if force is None else RowStore.from_dump(load_dump(force), inp.args().n_layers)
    for out, offset in jobs:
        parallel.use(replace(tp, offset=offset))
        try:
            cap = engine_capture(inp, tg, force=store, select=replicated, name=f"rank{tp.rank}")
        finally:
            parallel.use(None)
        records = [replace(r, rank=tp.rank, world_size=tp.world) for r in cap.dump.records]
        save_records(Path(out) / f"rank{tp.rank}" if tp.world > 1 else Path(out), records, cap.dump.memory)


def check_dirs(out: str | Path, planted: bool = False) -> tuple[Path, Path]:
    """The dump dirs of `check_tp` under `out`, refused unless new or empty (checked before any long work)."""
    out = Path(out)
    one_dir, tp_dir = out / "one", out / ("tp_planted" if planted else "tp")
    for d in (one_dir, tp_dir):
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise ParityError(f"{d}: not an empty dir; give --out a new or empty dir")
    return one_dir, tp_dir


def check_tp(
    inp: RunInputs,
    world: int,
    out: str | Path,
    *,
    backend: str = "gloo",
    offset: tuple[int, str, int] | None = None,
) -> tuple[list[PairResult], Path, Path]:
    """The TP check: the one-process run of `inp` (`out/one`), the same workload at TP world size `world`, forced
    with it (`out/tp`, or `out/tp_planted` with a planted `offset`), compared record by record under `gate(world)`.
    Returns (results, one-process dir, TP dir). MTP drafting is off: rows of rejected drafts are never forced."""
    one_dir, tp_dir = check_dirs(out, offset is not None)
    parallel.check_backend(backend, inp.device)
    if getattr(inp, "stream", False):
        # the streamed blocks read their weights outside `load_params`, which is where a rank takes its slices
        raise ParityError("tensor parallel: the case streams its weights (stream = true); TP runs load them whole")
    inp = replace(inp, engine=replace(inp.engine, mtp_draft=0))
    tg = targets(inp)
    one = engine_capture(inp, tg)
    save_records(one_dir, one.dump.records, one.dump.memory)
    tp_capture(inp, tg, world, [(tp_dir, offset)], backend=backend, force=one_dir)
    return compare_dumps(load_dump(one_dir), load_dump(tp_dir), thresholds=gate(world)), one_dir, tp_dir

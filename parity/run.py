"""The main job: run a parity case end to end and judge it.

1. Checkpoint: the given official-format one, or a synthetic one written for the case's model.
2. Targets: the reference generates every request alone; its tokens and MTP drafts are forced on every later run,
   so all runs emit the same tokens and schedule the same steps (`parity.capture.runs`).
3. The optimized engine runs all requests as one workload (chained: what a user gets), then the reference runs
   each request alone on the engine's schedule, then the engine runs again teacher-forced at every site with the
   reference's values: each site's own error (`parity.capture.forcing`).
4. The verdict (`parity.compare.verdict`): every site, row by row, against the case's noise model (calibrated, or
   bitwise for decode-exact cases); rows over it get a second opinion from the float64 golden, run when needed.
   The first failure in execution order names the layer, sub-module, phase, step, request and position.

Everything is captured through `parity.dump` in memory; `--dump DIR` writes the runs out as dump dirs that
`parity judge`, `parity compare` and `parity bisect` read again.
"""

import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parity import engines, machine
from parity.bisect_active import active_bisect
from parity.capture import runs
from parity.capture.save import save_run
from parity.capture.session import Captures, add_forced, capture, judge
from parity.cases import Case
from parity.checkpoint import Checkpoint, write_checkpoint
from parity.checkpoint.subset import write_subset
from parity.compare.thresholds import NON_BITWISE_DEFAULTS, NoiseModel
from parity.compare.verdict import judge_run
from parity.errors import ParityError
from parity.io import atomic_write_json
from parity.optimized.engine import EngineConfig
from parity.optimized.ops import OpsConfig, registry
from parity.progress import Progress, step
from parity.report.rowmap import site_rows, worst_site
from parity.selftest.bugs import Bug, library
from parity.stream.measure import StreamMeasure


@dataclass
class RequestRow:
    index: int
    prompt_len: int
    first_chunk: int
    tokens: int
    greedy_equal: bool  # the engine's own greedy choice (chained run) equals the reference's (same schedule)
    logits_max_err: float  # chained run: worst relative L2 error of a logits row
    mtp: str  # drafts accepted / proposed


@dataclass
class RunReport:
    case: str
    checkpoint: str
    device: str
    machine: dict
    backends: dict[str, str]
    exact: bool
    noise: str
    passed: bool
    location: str
    sites: list[dict] = field(default_factory=list)  # the forced verdict, one row per (site, field, phase)
    chained: list[dict] = field(default_factory=list)  # the chained run measured the same way (not gated)
    requests: list[RequestRow] = field(default_factory=list)
    golden: bool = False
    forced_rows: int = 0
    missed_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    bisect: dict | None = None  # the active bisect (`--bisect`): replays, layer, site, confirmation
    wall_s: float = 0.0
    planted: str | None = None  # the selftest bug planted into the optimized side (`--plant`), if any
    noise_provenance: dict = field(default_factory=dict)  # the calibration's provenance (empty: bitwise, defaults)
    # every row of one site (the first failure, else the closest to its threshold) by request and position: the
    # report's heatmap (`parity.report.rowmap`)
    rowmap: dict | None = None
    memory: dict | None = None  # streamed runs: peak RSS against one layer's weights (parity.stream.memory)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_checkpoint(
    case: Case, checkpoint: str | os.PathLike | None, out_dir: Path, progress: Progress | None = None
) -> Path:
    """Use `checkpoint` if given (its config must be the case's model), else the case's own (`[model] checkpoint`),
    else write the case's synthetic one."""
    checkpoint = checkpoint if checkpoint is not None else case.checkpoint
    if checkpoint is not None:
        Checkpoint(checkpoint).check_model(case.full_args(), f"case {case.name!r} ({case.source})")
        path = Path(checkpoint)
    else:
        step(progress, "writing the synthetic checkpoint", 0, 1)
        path = write_checkpoint(out_dir / "checkpoint", case.full_args(), seed=case.seed, init=case.init)
        step(progress, "writing the synthetic checkpoint", 1, 1)
    if case.layers is None:
        return path
    # `[model] layers`: a small index over the same shards, its layers renamed (parity.checkpoint.subset)
    return write_subset(path, case.layers, out_dir / "checkpoint-layers", case.full_args())


def engine_config(case: Case, prompts: list[torch.Tensor]) -> EngineConfig:
    """The case's engine settings; `num_blocks` 0 = what the requests need at the case's largest compress ratio."""
    e = case.engine
    return EngineConfig(
        max_requests=len(prompts),
        num_blocks=e.num_blocks or case.blocks_needed(),
        block_size=e.block_size,
        chunk_size=e.chunk_size,
        token_budget=e.token_budget,
        mtp_draft=e.mtp_draft,
        decode_exact_chunks=e.decode_exact_chunks,
    )


def run_inputs(
    case: Case, checkpoint: Path, device: str = "cpu", order=None, ops: OpsConfig | None = None, stream: bool = False
):
    args = case.model_args()
    prompts = case.prompts(args.vocab_size)
    return runs.RunInputs(
        ckpt=Path(checkpoint),
        prompts=tuple(prompts),
        decode_steps=tuple(r.decode_steps for r in case.requests),
        engine=engine_config(case, prompts),
        ops=ops if ops is not None else OpsConfig.from_env(),
        device=device,
        overrides=case.overrides,
        order=None if order is None else tuple(order),
        stream=stream or case.stream,
    )


def noise_model(case: Case, ops: OpsConfig | None = None) -> NoiseModel:
    """Bitwise for decode-exact cases whose selected ops all claim bitwise equality with their twins; else the
    case's calibration file, or the stated defaults (a non-bitwise kernel is judged by noise and the golden)."""
    approx = non_bitwise_ops(ops or OpsConfig.from_env())
    if case.engine.decode_exact_chunks and not approx:
        return NoiseModel(exact=True, source="decode-exact")
    if case.calibration is not None:
        return NoiseModel.load(case.calibration)
    return NoiseModel(source=f"{NON_BITWISE_DEFAULTS}{', '.join(approx)})" if approx else "defaults")


def non_bitwise_ops(ops: OpsConfig) -> list[str]:
    table = registry()
    # an unregistered backend is refused with its own message when the ops are resolved
    return [op for op, b in ops.backends().items() if b in table[op] and not table[op][b].bitwise]


def request_rows(c: Captures) -> list[RequestRow]:
    """The chained engine's own greedy choices and logits against the reference on the same schedule."""
    rows = []
    for i, prompt in enumerate(c.inputs.prompts):
        req, want = c.chained.requests[i], c.reference.generations[i]
        n = min(len(req.logits), len(want.logits))
        greedy = all(int(a.argmax()) == int(b.argmax()) for a, b in zip(req.logits[:n], want.logits[:n]))
        err = max(
            (float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)) for a, b in
             zip(req.logits[:n], want.logits[:n])),
            default=0.0,
        )  # fmt: skip
        mtp = f"{req.drafts_accepted}/{req.drafts_proposed}" if c.inputs.mtp else "-"
        rows.append(RequestRow(i, len(prompt), req.first_chunk, len(req.output), greedy, err, mtp))
    return rows


def planted_bug(case: Case, name: str) -> Bug:
    """The selftest library's bug `name` for the case's model; an unknown name is refused listing the valid ones."""
    bugs = library(case.model_args().n_layers)
    for bug in bugs:
        if bug.name == name:
            return bug
    raise ParityError(f"--plant: unknown bug {name!r}; valid: {', '.join(b.name for b in bugs)}")


def _with_bug(transform_ops, bug: Bug | None):
    """`transform_ops` followed by the bug's ops transform (what `parity selftest` plants into the engine)."""
    if bug is None or bug.ops is None:
        return transform_ops
    if transform_ops is None:
        return bug.ops
    return lambda ops: bug.ops(transform_ops(ops))


def run_case(
    case: Case,
    checkpoint: Path,
    device: str = "cpu",
    dump_dir: Path | None = None,
    *,
    ops: OpsConfig | None = None,
    transform_ops=None,
    golden: str = "auto",
    noise: NoiseModel | None = None,
    bisect: bool = False,
    plant: str | None = None,
    progress: Progress | None = None,
    then: Callable[[RunReport, Captures], object] | None = None,
) -> RunReport:
    """The optimized engine against the reference on every request of `case` (module docstring). `plant` names a
    bug of the selftest library planted into the optimized side for every engine run (chained, forced, bisect
    replays), as `parity selftest` plants it: its ops transform and its patch context; the reference is untouched.
    `then(report, captures)` runs last, with the run's captures before they are dropped (a failed run's kernel
    repros record from them instead of capturing every run again); the planted bug's patch is no longer applied."""
    if case.candidate != "optimized":  # another implementation (HF transformers): its own runs, the same verdict
        return engines.run_candidate(case, checkpoint, device, dump_dir, noise=noise, golden=golden, bisect=bisect,
                                     plant=plant)  # fmt: skip
    bug = planted_bug(case, plant) if plant is not None else None
    measure = StreamMeasure(case, checkpoint) if case.stream else nullcontext()
    with bug.patch() if bug is not None else nullcontext(), measure:
        planted = _with_bug(transform_ops, bug)
        report, c = _run_case(
            case, checkpoint, device, dump_dir, ops, planted, golden, noise, bisect, measure, progress
        )
    report.planted = plant
    report.memory = measure.result() if case.stream else None
    if then is not None:
        then(report, c)
    return report


def _run_case(
    case, checkpoint, device, dump_dir, ops, transform_ops, golden, noise, bisect, measure, progress=None
) -> tuple[RunReport, Captures]:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    inp = run_inputs(case, checkpoint, device, ops=ops)
    noise = noise if noise is not None else noise_model(case, inp.ops)
    # a decode-exact run that is bitwise chained is bitwise forced too: the forced run only localizes a failure
    c = capture(inp, transform_ops, timings, forced=not noise.exact, progress=progress)
    t = time.perf_counter()
    chained = judge_run(c.reference.dump, c.chained.dump, c.layout, c.n_layers, noise)
    if c.forced is None and not chained.passed:
        c = add_forced(c, transform_ops, timings, progress)
    verdict = judge(c, noise, golden, timings, progress) if c.forced is not None else chained
    timings["judge"] = time.perf_counter() - t
    missed = sum(c.forced.missed.values()) if c.forced is not None else 0
    location = verdict.location()
    if missed and not location:
        location = f"teacher forcing found no reference value for {missed} rows: the runs are not aligned"
    report = RunReport(
        case=case.name,
        checkpoint=str(checkpoint),
        device=device,
        machine=machine.describe(),
        backends=inp.ops.backends(),
        exact=case.engine.decode_exact_chunks,
        noise=noise.source,
        passed=verdict.passed and not missed,
        location=location,
        sites=[r.to_row() for r in verdict.results],
        chained=[r.to_row() for r in chained.results],
        requests=request_rows(c),
        golden=c.golden is not None,
        forced_rows=sum(c.forced.forced.values()) if c.forced is not None else 0,
        missed_rows=missed,
        timings=timings,
    )
    worst = worst_site(verdict)
    if worst is not None:
        judged = c.forced if c.forced is not None else c.chained
        kind = "forced" if c.forced is not None else "chained"
        report.rowmap = site_rows(c.reference.dump, judged.dump, c.n_layers, worst, kind)
    report.noise_provenance = dict(noise.provenance)
    if bisect:
        report.bisect = asdict(active_bisect(c, noise, transform_ops))
    if dump_dir is not None:
        save_run(c, dump_dir, noise)
    if isinstance(measure, StreamMeasure):
        measure.held(c)  # the captures and caches every run keeps: the activations of the memory bound
    report.wall_s = time.perf_counter() - t0
    return report, c


def write_report(report: RunReport, out_dir: Path) -> Path:
    return atomic_write_json(out_dir / "parity.json", report.to_dict())

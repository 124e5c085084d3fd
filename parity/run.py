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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parity import machine
from parity.bisect_active import active_bisect
from parity.capture import runs
from parity.capture.save import save_run
from parity.capture.session import Captures, add_forced, capture, judge
from parity.cases import Case
from parity.checkpoint import Checkpoint, write_checkpoint
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import judge_run
from parity.io import atomic_write_json
from parity.optimized.engine import EngineConfig
from parity.optimized.ops import OpsConfig, registry


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

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_checkpoint(case: Case, checkpoint: str | os.PathLike | None, out_dir: Path) -> Path:
    """Use `checkpoint` if given (its config must be the case's model), else write the case's synthetic one."""
    if checkpoint is not None:
        Checkpoint(checkpoint).check_model(case.model_args(), f"case {case.name!r} ({case.source})")
        return Path(checkpoint)
    return write_checkpoint(out_dir / "checkpoint", case.model_args(), seed=case.seed, init=case.init)


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


def run_inputs(case: Case, checkpoint: Path, device: str = "cpu", order=None, ops: OpsConfig | None = None):
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
    )


def noise_model(case: Case, ops: OpsConfig | None = None) -> NoiseModel:
    """Bitwise for decode-exact cases whose selected ops all claim bitwise equality with their twins; else the
    case's calibration file, or the stated defaults (a non-bitwise kernel is judged by noise and the golden)."""
    approx = non_bitwise_ops(ops or OpsConfig.from_env())
    if case.engine.decode_exact_chunks and not approx:
        return NoiseModel(exact=True, source="decode-exact")
    if case.calibration is not None:
        return NoiseModel.load(case.calibration)
    note = f" (non-bitwise ops selected: {', '.join(approx)})" if approx else ""
    return NoiseModel(source=f"defaults{note}")


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
) -> RunReport:
    """The optimized engine against the reference on every request of `case` (module docstring)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    inp = run_inputs(case, checkpoint, device, ops=ops)
    noise = noise if noise is not None else noise_model(case, inp.ops)
    # a decode-exact run that is bitwise chained is bitwise forced too: the forced run only localizes a failure
    c = capture(inp, transform_ops, timings, forced=not noise.exact)
    t = time.perf_counter()
    chained = judge_run(c.reference.dump, c.chained.dump, c.layout, c.n_layers, noise)
    if c.forced is None and not chained.passed:
        c = add_forced(c, transform_ops, timings)
    verdict = judge(c, noise, golden, timings) if c.forced is not None else chained
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
    if bisect:
        report.bisect = asdict(active_bisect(c, noise, transform_ops))
    if dump_dir is not None:
        save_run(c, dump_dir, noise)
    report.wall_s = time.perf_counter() - t0
    return report


def write_report(report: RunReport, out_dir: Path) -> Path:
    return atomic_write_json(out_dir / "parity.json", report.to_dict())

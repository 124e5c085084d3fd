"""The main job: run a parity case end to end and judge it.

1. Checkpoint: the given official-format one, or a synthetic one written for the case's model.
2. The optimized engine runs all requests as one workload (chunked prefill, decodes, MTP verification), teacher-
   forced with the reference's greedy tokens; the reference runs each request alone with the engine's prefill /
   decode split (`parity.check`).
3. Every traced module (each layer's streams, attention and MoE outputs; the MTP block's) is compared at every
   position, plus the logits of every emitted token. A module fails when it is not bitwise equal (decode-exact
   cases) or its cosine drops below the case's `min_cos`; the first failing module in execution order is the
   verdict's location (layer, module, request, position, phase).
"""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parity.cases import Case
from parity.check import RunParity, check_engine
from parity.checkpoint import Checkpoint, write_checkpoint
from parity.errors import ParityError
from parity.io import atomic_write_json
from parity.optimized.engine import EngineConfig
from parity.optimized.ops import OpsConfig


@dataclass
class ModuleRow:
    module: str
    positions: int
    bitwise_requests: int
    requests: int
    min_cos: float
    max_abs: float
    worst: str  # "req R @ pos P (phase)"
    passed: bool


@dataclass
class RequestRow:
    index: int
    prompt_len: int
    first_chunk: int
    tokens: int
    tokens_equal: bool
    logits_bitwise: bool
    logits_min_cos: float
    mtp: str
    passed: bool


@dataclass
class CaseReport:
    case: str
    checkpoint: str
    device: str
    torch_version: str
    exact: bool
    min_cos: float
    modules: list[ModuleRow] = field(default_factory=list)
    requests: list[RequestRow] = field(default_factory=list)
    first_failure: str | None = None
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.first_failure is None

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def prepare_checkpoint(case: Case, checkpoint: str | os.PathLike | None, out_dir: Path) -> Path:
    """Use `checkpoint` if given (its config must be the case's model), else write the case's synthetic one."""
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint)
        if ckpt.args.official_dict() != case.model_args().official_dict():
            raise ParityError(f"{checkpoint}: inference/config.json does not match case {case.name!r}'s model")
        return Path(checkpoint)
    return write_checkpoint(out_dir / "checkpoint", case.model_args(), seed=case.seed)


def _phase(module: str, position: int, prompt_len: int, first_chunk: int) -> str:
    if module.startswith("mtp."):
        return "mtp-draft"
    if position < first_chunk:
        return "prefill"
    return "prefill chunk" if position < prompt_len else "decode"


def judge(case: Case, result: RunParity, prompts: list[torch.Tensor]) -> tuple[list[ModuleRow], list[RequestRow], str]:
    """Module and request rows, and the first failure in execution order ('' when everything passes)."""
    exact = case.engine.decode_exact_chunks

    def ok(bitwise: bool, cos: float | None) -> bool:
        return bitwise if exact else bitwise or (cos is not None and cos >= case.min_cos)

    order = {m: i for i, m in enumerate(dict.fromkeys(m.module for m in result.modules))}
    first = None
    rows = []
    for module in order:
        group = [m for m in result.modules if m.module == module]
        worst = min(group, key=lambda m: 1.0 if m.metrics.bitwise else m.metrics.cos)
        req = result.requests[worst.key]
        where = ""
        if worst.worst_position is not None:
            phase = _phase(module, worst.worst_position, len(prompts[worst.key]), req.first_chunk)
            where = f"req {worst.key} @ pos {worst.worst_position} ({phase})"
        passed = all(ok(m.metrics.bitwise, m.metrics.cos) for m in group)
        cos = min(1.0 if m.metrics.bitwise else m.metrics.cos for m in group)
        max_abs = max(m.metrics.max_abs or 0.0 for m in group)
        bitwise = sum(m.metrics.bitwise for m in group)
        positions = sum(m.positions for m in group)
        rows.append(ModuleRow(module, positions, bitwise, len(group), cos, max_abs, where, passed))
        if not passed and first is None:
            first = f"{module}: {where or 'req ' + str(worst.key)}, cos {cos:.6f}, max|diff| {max_abs:.4g}"
    requests = []
    for lg in result.logits:
        req = result.requests[lg.key]
        passed = ok(lg.bitwise, lg.min_cos)
        mtp = f"{req.drafts_accepted}/{req.drafts_proposed}" if case.engine.mtp_draft else "-"
        requests.append(
            RequestRow(
                lg.key,
                len(prompts[lg.key]),
                req.first_chunk,
                lg.steps,
                lg.tokens_equal,
                lg.bitwise,
                lg.min_cos,
                mtp,
                passed,
            )  # fmt: skip
        )
        if not passed and first is None:
            first = f"logits of request {lg.key}: cos {lg.min_cos:.6f}"
    return rows, requests, first or ""


def run_case(case: Case, checkpoint: Path, device: str = "cpu", dump_dir: Path | None = None) -> CaseReport:
    """Engine vs reference on every request of `case`; `dump_dir` also dumps the engine run (`parity.dump`)."""
    t0 = time.perf_counter()
    args = case.model_args()
    prompts = case.prompts(args.vocab_size)
    steps = [r.decode_steps for r in case.requests]
    e = case.engine
    ratio_entries = sum(-(-(len(p) + n + 2) // 4 // e.block_size) + 1 for p, n in zip(prompts, steps))
    config = EngineConfig(
        max_requests=len(prompts),
        num_blocks=e.num_blocks or ratio_entries,
        block_size=e.block_size,
        chunk_size=e.chunk_size,
        token_budget=e.token_budget,
        mtp_draft=e.mtp_draft,
        decode_exact_chunks=e.decode_exact_chunks,
    )
    result = check_engine(
        checkpoint, prompts, steps, config, ops=OpsConfig.from_env(), device=device, dump_dir=dump_dir,
        **dict(case.overrides),
    )  # fmt: skip
    modules, requests, first = judge(case, result, prompts)
    report = CaseReport(
        case.name, str(checkpoint), device, torch.__version__, e.decode_exact_chunks, case.min_cos, modules, requests,
        first or None, time.perf_counter() - t0,
    )  # fmt: skip
    return report


def write_report(report: CaseReport, out_dir: Path) -> Path:
    return atomic_write_json(out_dir / "parity.json", report.to_dict())

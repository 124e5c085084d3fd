"""The main job: run a parity case end to end and collect a summary.

For each request of the case: build the reference model from the case's checkpoint (a synthetic one in the official
format unless a real one is given), prefill, decode greedily, and draft with the MTP block.
"""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from parity.cases import Case
from parity.checkpoint import Checkpoint, build_model, write_checkpoint
from parity.errors import ParityError
from parity.io import atomic_write_json
from parity.reference.generate import greedy_generate


@dataclass
class RequestSummary:
    index: int
    prompt_len: int
    decode_steps: int
    tokens: list[int]
    prefill_ms: float
    decode_ms_per_token: float
    mtp_accepted: int
    mtp_checked: int
    logits_finite: bool


@dataclass
class RunSummary:
    case: str
    checkpoint: str
    device: str
    torch_version: str
    requests: list[RequestSummary] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.logits_finite for r in self.requests)

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_checkpoint(case: Case, checkpoint: str | os.PathLike | None, out_dir: Path) -> Path:
    """Use `checkpoint` if given (checked for readability), else write the case's synthetic one under out_dir."""
    if checkpoint is not None:
        ckpt = Checkpoint(checkpoint)
        expected = case.model_args()
        if ckpt.args.official_dict() != expected.official_dict():
            raise ParityError(f"{checkpoint}: inference/config.json does not match case {case.name!r}'s model")
        return Path(checkpoint)
    return write_checkpoint(out_dir / "checkpoint", case.model_args(), seed=case.seed)


def run_reference(case: Case, checkpoint: Path, device: str = "cpu") -> RunSummary:
    """Greedy-generate every request of `case` alone with a fresh reference model."""
    t_start = time.perf_counter()
    summary = RunSummary(case.name, str(checkpoint), device, torch.__version__)
    args = case.model_args()
    overrides = dict(case.overrides)
    for i, (spec, prompt) in enumerate(zip(case.requests, case.prompts(args.vocab_size))):
        model, _ = build_model(checkpoint, device=device, **overrides)
        gen = greedy_generate(model, prompt, spec.decode_steps)
        decode_ms = 1e3 * sum(gen.decode_s) / max(1, len(gen.decode_s))
        summary.requests.append(
            RequestSummary(
                index=i,
                prompt_len=spec.prompt_len,
                decode_steps=spec.decode_steps,
                tokens=gen.tokens,
                prefill_ms=1e3 * gen.prefill_s,
                decode_ms_per_token=decode_ms,
                mtp_accepted=gen.mtp_accepted,
                mtp_checked=gen.mtp_checked,
                logits_finite=all(bool(x.isfinite().all()) for x in gen.logits),
            )
        )
    summary.wall_s = time.perf_counter() - t_start
    return summary


def write_summary(summary: RunSummary, out_dir: Path) -> Path:
    return atomic_write_json(out_dir / "reference.json", summary.to_dict())

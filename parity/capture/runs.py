"""The runs behind a verdict, each captured through `parity.dump` (in memory) at the sites of both models.

- `targets`: the reference generates every request alone (whole-prompt prefill, greedy decodes, MTP drafts);
  its tokens and drafts are then forced on every other run, so all runs emit the same tokens, verify the same
  drafts and therefore schedule the same steps.
- `engine_capture`: the optimized engine runs all requests as one workload (chunked prefill, mixed batches, MTP
  verification); optionally teacher-forced at chosen sites from a stored run (`capture.forcing`).
- `reference_capture`: the reference runs each request alone on the engine's schedule (its first prefill chunk,
  then one decode per token), optionally forced the same way, optionally with the float64 golden kernels.

Rows of every record carry (request, position) (`compare.rows`); rows of a step whose token is not the targeted
one (a draft the engine verified and rejected) are tagged `skip_rows` and never compared or forced.
"""

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parity import dump
from parity.capture import forcing
from parity.capture.reference import attach
from parity.checkpoint import Checkpoint, build_model
from parity.compare.loader import Dump
from parity.compare.rows import RowStore
from parity.compare.sites import tap_pattern
from parity.config import ModelArgs
from parity.golden import golden_kernels
from parity.optimized.engine import Engine, EngineConfig, Request
from parity.optimized.model import OptimizedTransformer
from parity.optimized.ops import Ops, OpsConfig, resolve_ops
from parity.progress import Progress, step
from parity.reference.generate import Generation, greedy_generate
from parity.stream import build_streamed


@dataclass(frozen=True)
class RunInputs:
    """What every run of one verdict shares."""

    ckpt: Path
    prompts: tuple[torch.Tensor, ...]
    decode_steps: tuple[int, ...]
    engine: EngineConfig
    ops: OpsConfig = OpsConfig()
    device: str = "cpu"
    overrides: tuple[tuple[str, object], ...] = ()  # ModelArgs fields, validated by ModelArgs itself
    order: tuple[int, ...] | None = None  # admission order of the requests (batch composition); None = as given
    stream: bool = False  # layer-streamed weights: one block in memory at a time (parity.stream)

    def args(self) -> ModelArgs:
        return Checkpoint(self.ckpt).args.with_(self.overrides)

    def build(self, factory=None):
        build = build_streamed if self.stream else build_model
        model, _ = build(self.ckpt, device=self.device, factory=factory, overrides=dict(self.overrides))
        return model

    @property
    def mtp(self) -> bool:
        return self.engine.mtp_draft > 0


@dataclass
class Targets:
    """The tokens every run emits and the MTP drafts every engine run verifies, per request."""

    tokens: list[list[int]]
    drafts: list[list[int]]  # drafts[i][j]: the reference's MTP draft for position len(prompt_i) + 1 + j
    generations: list[Generation] = field(default_factory=list)

    def sequence(self, prompts, i: int) -> list[int]:
        return prompts[i].tolist() + self.tokens[i]


@dataclass
class Capture:
    """One run's records (an in-memory dump) and what it produced."""

    dump: Dump
    requests: dict[int, Request] = field(default_factory=dict)  # engine runs: by prompt index
    generations: list[Generation] = field(default_factory=list)  # reference runs
    forced: dict[str, int] = field(default_factory=dict)  # rows replaced per site
    missed: dict[str, int] = field(default_factory=dict)  # rows the forcing source had no value for

    def first_chunks(self) -> list[int]:
        return [self.requests[i].first_chunk for i in sorted(self.requests)]


def _config() -> dump.DumpConfig:
    return dump.DumpConfig(modules=tap_pattern())


def targets(inp: RunInputs, progress: Progress | None = None) -> Targets:
    """The reference's own greedy run of every request (what the official generate.py does), with MTP drafts."""
    gens = []
    for i, prompt in enumerate(inp.prompts):
        model = inp.build()
        gens.append(greedy_generate(model, prompt, inp.decode_steps[i], mtp=inp.mtp))
        step(progress, "the reference generates each request", i + 1, len(inp.prompts))
    return Targets([g.tokens for g in gens], [g.mtp_drafts for g in gens], gens)


def reference_capture(
    inp: RunInputs,
    tg: Targets,
    first_chunks: list[int],
    *,
    force: RowStore | None = None,
    golden: bool = False,
    name: str = "reference",
    progress: Progress | None = None,
) -> Capture:
    """Each request alone on the engine's schedule, taps recorded (and forced from `force`)."""
    writer = dump.MemoryWriter()
    gens, forced, missed = [], {}, {}
    n_layers = inp.args().n_layers
    for i, prompt in enumerate(inp.prompts):
        kernels = golden_kernels() if golden else nullcontext()
        with kernels:
            model = inp.build()
            attached = attach(model)
            handle = dump.install(model, _config(), writer=writer)
            forcer = forcing.Forcing(model, force, forcing.everything, n_layers) if force is not None else None
            steps = iter(range(10**9))

            def scope(kind, pos, n, i=i, steps=steps):
                phase = "mtp-draft" if kind == "mtp" else ("prefill" if pos == 0 else "decode")
                return dump.phase(phase, next(steps), cu_seqlens=[0, n], requests=[i], start_pos=[pos])

            try:
                gens.append(
                    greedy_generate(
                        model,
                        prompt,
                        inp.decode_steps[i],
                        mtp=inp.mtp,
                        prefill_len=first_chunks[i],
                        forced=tg.tokens[i],
                        scope=scope,
                    )  # fmt: skip
                )
            finally:
                handle.remove()
                attached.remove()
                if forcer is not None:
                    forcer.remove()
                    _add(forced, forcer.forced)
                    _add(missed, forcer.missed)
        step(progress, "each request alone on the engine's schedule", i + 1, len(inp.prompts))
    return Capture(Dump.from_memory(writer, name), generations=gens, forced=forced, missed=missed)


def engine_capture(
    inp: RunInputs,
    tg: Targets,
    *,
    force: RowStore | None = None,
    select: Callable = forcing.everything,
    transform_ops: Callable[[Ops], Ops] | None = None,
    draft_fn: Callable[[Request, list[int]], list[int]] | None = None,
    name: str = "optimized",
    progress: Progress | None = None,
) -> Capture:
    """All requests through one engine, taps recorded (and forced from `force` at the sites `select` picks).
    `draft_fn` replaces the default draft policy (the reference's MTP drafts at the same positions)."""
    ops = resolve_ops(inp.ops)
    if transform_ops is not None:
        ops = transform_ops(ops)
    model = inp.build(factory=lambda args: OptimizedTransformer(args, ops))
    n_layers = model.args.n_layers
    writer = dump.MemoryWriter()
    handle = dump.install(model, _config(), writer=writer)  # before the forcing: records the model's own values
    forcer = forcing.Forcing(model, force, select, n_layers) if force is not None else None
    index_of: dict[int, int] = {}
    sequences = [tg.sequence(inp.prompts, i) for i in range(len(inp.prompts))]

    def tag(phase, step_index, batch):
        step(progress, "engine steps", step_index + 1)
        requests = [index_of[r] for r in batch.request_ids]
        # the MTP block reads the token after each position; the main model the token at it
        shift = 1 if phase == "mtp-draft" else 0
        tokens = batch.tokens.tolist()
        skip = []
        for i, req in enumerate(requests):
            seq = sequences[req]
            for r in range(batch.cu_seqlens[i], batch.cu_seqlens[i + 1]):
                pos = batch.start_pos[i] + r - batch.cu_seqlens[i]
                # the reference never feeds the last emitted token back in: a verified draft there has no twin
                if pos >= len(seq) - 1 or tokens[r] != seq[pos + shift]:
                    skip.append(r)
        return dump.phase(
            phase, step_index, cu_seqlens=batch.cu_seqlens, requests=requests, start_pos=batch.start_pos,
            speculative=batch.speculative, skip_rows=skip,
        )  # fmt: skip

    def drafts(req: Request, own: list[int]) -> list[int]:
        # the reference's MTP drafts at the same positions, so every engine run verifies the same drafts
        i, n = index_of[req.id], len(inp.prompts[index_of[req.id]])
        first = len(req.tokens) - n - 1
        out = []
        for j, mine in enumerate(own):
            ref = tg.drafts[i]
            out.append(ref[first + j] if 0 <= first + j < len(ref) else mine)
        return out

    engine = Engine(model, inp.engine, on_phase=tag, draft_fn=(draft_fn or drafts) if inp.mtp else None)
    order = list(range(len(inp.prompts))) if inp.order is None else list(inp.order)
    ids = {i: engine.add_request(inp.prompts[i], inp.decode_steps[i] + 1, tg.tokens[i]) for i in order}
    index_of.update({rid: i for i, rid in ids.items()})
    try:
        finished = engine.run()
    finally:
        handle.remove()
        if forcer is not None:
            forcer.remove()
    cap = Capture(Dump.from_memory(writer, name), {i: finished[rid] for i, rid in ids.items()})
    if forcer is not None:
        cap.forced, cap.missed = dict(forcer.forced), dict(forcer.missed)
    return cap


def _add(total: dict, counts) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v

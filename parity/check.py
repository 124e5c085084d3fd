"""Engine-vs-reference parity: run requests through the optimized engine (one ragged batch) and through the
reference one request at a time, and compare every traced layer at every position, the logits and the tokens.

The reference runs each request twice, teacher-forced with the same tokens so every run stays aligned:
- `full`: the whole prompt in one prefill, then one decode per token (what the official generate.py does);
- `schedule`: the engine's first prompt chunk as a prefill, then every later token as one decode. This is the
  reference computation that matches the engine's schedule: with `decode_exact_chunks` the engine must equal it
  bit for bit; with the default batched ops it differs only by GEMM and vectorization shapes.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parity import dump
from parity.checkpoint import build_model
from parity.compare.metrics import compare_tensors
from parity.dump import DumpConfig
from parity.optimized.engine import Engine, EngineConfig, Request
from parity.optimized.model import OptimizedTransformer
from parity.optimized.ops import OpsConfig, resolve_ops
from parity.reference.generate import Generation, greedy_generate
from parity.trace import TRACED, ModuleParity, Trace, compare_traces, trace_engine, trace_reference


@dataclass
class LogitsParity:
    key: int
    steps: int
    bitwise: bool
    min_cos: float
    max_abs: float
    tokens_equal: bool  # the engine's greedy choice at every step equals the reference's


@dataclass
class RunParity:
    modules: list[ModuleParity]
    logits: list[LogitsParity]
    requests: dict[int, Request] = field(default_factory=dict)
    reference: list[Generation] = field(default_factory=list)

    @property
    def bitwise(self) -> bool:
        return all(m.metrics.bitwise for m in self.modules) and all(lg.bitwise for lg in self.logits)

    def worst(self, n: int = 5) -> list[ModuleParity]:
        return sorted(self.modules, key=lambda m: m.metrics.cos if m.metrics.cos is not None else -2.0)[:n]

    def min_cos(self, pattern: str = "") -> float:
        return min((m.metrics.cos for m in self.modules if pattern in m.module), default=1.0)


def _per_request(value, n: int) -> list:
    return list(value) if isinstance(value, list | tuple) else [value] * n


def reference_generations(
    ckpt,
    prompts,
    decode_steps,
    *,
    prefill_lens=None,
    forced=None,
    trace: Trace | None = None,
    device="cpu",
    mtp: bool = True,
    **overrides,
) -> list[Generation]:
    """Solo reference runs (a fresh model per request), traced under the request's index. `decode_steps` is one
    int or one per request."""
    steps = _per_request(decode_steps, len(prompts))
    out = []
    for i, prompt in enumerate(prompts):
        model, _ = build_model(ckpt, device=device, **overrides)
        run = dict(prefill_len=None if prefill_lens is None else prefill_lens[i], mtp=mtp)
        run["forced"] = None if forced is None else forced[i]
        if trace is None:
            out.append(greedy_generate(model, prompt, steps[i], **run))
        else:
            with trace_reference(model, i, trace):
                out.append(greedy_generate(model, prompt, steps[i], **run))
    return out


def engine_generations(
    ckpt,
    prompts,
    decode_steps,
    config: EngineConfig,
    *,
    forced=None,
    draft_fn: Callable | None = None,
    ops: OpsConfig | None = None,
    trace: Trace | None = None,
    order: list[int] | None = None,
    device="cpu",
    dump_dir=None,
    **overrides,
) -> dict[int, Request]:
    """All requests through one engine; returns requests keyed by prompt index. `order` is the admission order
    (prompt indices), to put the same request into other slots next to other batchmates. `dump_dir` dumps the
    traced modules of every forward with phase, step, ragged layout and prompt-index tags (`parity.dump`)."""
    factory = lambda args: OptimizedTransformer(args, resolve_ops(ops))  # noqa: E731
    model, _ = build_model(ckpt, device=device, factory=factory, **overrides)
    index_of: dict[int, int] = {}

    def tag(phase, step, batch):
        requests = [index_of[r] for r in batch.request_ids]
        return dump.phase(phase, step, cu_seqlens=batch.cu_seqlens, requests=requests, speculative=batch.speculative)

    engine = Engine(model, config, on_phase=tag if dump_dir is not None else None, draft_fn=draft_fn)
    order = list(range(len(prompts))) if order is None else order
    steps = _per_request(decode_steps, len(prompts))
    ids = {i: engine.add_request(prompts[i], steps[i] + 1, None if forced is None else forced[i]) for i in order}
    index_of.update({rid: i for i, rid in ids.items()})
    handle = dump.install(model, DumpConfig(dir=str(dump_dir), modules=TRACED.pattern)) if dump_dir else None
    try:
        if trace is None:
            finished = engine.run()
        else:
            with trace_engine(engine, trace):
                finished = engine.run()
    finally:
        if handle is not None:
            handle.remove()
    by_index = {i: finished[rid] for i, rid in ids.items()}
    if trace is not None:
        # re-key the engine's trace from request ids to prompt indices
        trace.rows = {(index_of[k], m, p): v for (k, m, p), v in trace.rows.items()}
    return by_index


def compare_logits(reference: list[Generation], requests: dict[int, Request]) -> list[LogitsParity]:
    out = []
    for i, gen in enumerate(reference):
        req = requests[i]
        n = min(len(gen.logits), len(req.logits))
        a, b = torch.stack(gen.logits[:n]), torch.stack(req.logits[:n])
        m = compare_tensors(a, b)
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min().item() if n else 1.0
        tokens_equal = bool((a.argmax(-1) == b.argmax(-1)).all())
        out.append(LogitsParity(i, n, m.bitwise, 1.0 if m.bitwise else cos, m.max_abs or 0.0, tokens_equal))
    return out


def check_engine(
    ckpt,
    prompts,
    decode_steps,
    config: EngineConfig,
    *,
    against: str = "schedule",
    draft_fn=None,
    ops: OpsConfig | None = None,
    device="cpu",
    dump_dir=None,
    **overrides,
) -> RunParity:
    """Run the engine teacher-forced with the reference's greedy tokens and compare with the reference run
    `against` = "schedule" (same prefill/decode split) or "full" (whole-prompt prefill). `decode_steps`: one int
    or one per request; `dump_dir` dumps the engine run (see `engine_generations`)."""
    mtp = config.mtp_draft > 0
    common = dict(device=device, **overrides)
    full = reference_generations(ckpt, prompts, decode_steps, mtp=False, **common)
    forced = [g.tokens for g in full]
    engine_trace = Trace()
    requests = engine_generations(
        ckpt, prompts, decode_steps, config, forced=forced, draft_fn=draft_fn, ops=ops, trace=engine_trace,
        dump_dir=dump_dir, **common,
    )  # fmt: skip
    ref_trace = Trace()
    prefill_lens = [requests[i].first_chunk for i in range(len(prompts))] if against == "schedule" else None
    reference = reference_generations(
        ckpt, prompts, decode_steps, prefill_lens=prefill_lens, forced=forced, trace=ref_trace, mtp=mtp, **common
    )
    modules = compare_traces(ref_trace, engine_trace, list(range(len(prompts))))
    return RunParity(modules, compare_logits(reference, requests), requests, reference)

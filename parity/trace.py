"""Per-position activations of each request from the reference (one request at a time) and from the optimized
engine (ragged batches), keyed alike so they can be compared layer by layer and position by position.

Both sides record `(request, module, position) -> row` for the traced modules: every block's output streams
(`layers.i`, `[hc, D]` per position) and the attention and MoE outputs inside it (`layers.i.attn`, `layers.i.ffn`,
`mtp.i.attn`, `mtp.i.ffn`, `[D]`). A position computed twice (an MTP draft rejected, then replayed) keeps its last,
committed value; speculative MTP chaining (positions past the committed ones) is not recorded.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from parity.compare.metrics import TensorMetrics, compare_tensors

TRACED = re.compile(r"^(layers\.\d+|(layers|mtp)\.\d+\.(attn|ffn))$")
_BLOCK = re.compile(r"^(layers|mtp)\.\d+$")


class Trace:
    def __init__(self):
        self.rows: dict[tuple[object, str, int], torch.Tensor] = {}
        self.modules: list[str] = []  # in first-call order

    def put(self, key, module: str, positions: list[int], values: torch.Tensor) -> None:
        if module not in self.modules:
            self.modules.append(module)
        for p, v in zip(positions, values):
            self.rows[(key, module, p)] = v.detach().to("cpu", copy=True)

    def positions(self, key, module: str) -> list[int]:
        return sorted(p for k, m, p in self.rows if k == key and m == module)

    def stack(self, key, module: str, positions: list[int]) -> torch.Tensor:
        return torch.stack([self.rows[(key, module, p)] for p in positions])


def _traced(model) -> Iterator[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if TRACED.match(name) or _BLOCK.match(name):
            yield name, module


@contextmanager
def trace_reference(model, key, trace: Trace | None = None):
    """Record a reference model's calls (batch 1) under `key`; positions come from each block's start_pos."""
    trace = trace if trace is not None else Trace()
    current: dict[str, list[int]] = {}
    handles = []

    def pre(name):
        def hook(module, args):
            x, start_pos = args[0], args[1]
            current["positions"] = list(range(start_pos, start_pos + x.shape[1]))

        return hook

    def post(name):
        def hook(module, args, out):
            if TRACED.match(name):
                assert out.shape[0] == 1, "trace_reference runs one request at a time"
                trace.put(key, name, current["positions"], out[0])

        return hook

    for name, module in _traced(model):
        if _BLOCK.match(name):
            handles.append(module.register_forward_pre_hook(pre(name)))
        handles.append(module.register_forward_hook(post(name)))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace_engine(engine, trace: Trace | None = None):
    """Record every forward of an optimized `Engine`, split per request (key = engine request id)."""
    trace = trace if trace is not None else Trace()
    state = {}
    previous = engine.on_phase

    def on_phase(phase, step, batch):
        state["batch"] = batch
        return previous(phase, step, batch) if previous is not None else None

    def post(name):
        def hook(module, args, out):
            batch = state["batch"]
            if batch.speculative:
                return  # chained MTP drafts past the committed positions: rolled back, never compared
            positions = batch.positions.tolist()
            for i, rid in enumerate(batch.request_ids):
                rows = batch.rows(i)
                trace.put(rid, name, positions[rows], out[rows])

        return hook

    handles = [m.register_forward_hook(post(n)) for n, m in _traced(engine.model) if TRACED.match(n)]
    engine.on_phase = on_phase
    try:
        yield trace
    finally:
        engine.on_phase = previous
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class ModuleParity:
    """One request's module output over all its positions, reference vs optimized."""

    key: object
    module: str
    positions: int
    metrics: TensorMetrics
    worst_position: int | None  # position with the lowest cosine


def compare_traces(ref: Trace, opt: Trace, keys: list) -> list[ModuleParity]:
    """Compare every (request, module) present in both traces, in the reference's module order."""
    out = []
    for key in keys:
        for module in ref.modules:
            positions = sorted(set(ref.positions(key, module)) & set(opt.positions(key, module)))
            if not positions:
                continue
            a, b = ref.stack(key, module, positions), opt.stack(key, module, positions)
            m = compare_tensors(a, b)
            worst = None
            if not m.bitwise and m.worst_token is not None:
                worst = positions[m.worst_token[0][0]]
            out.append(ModuleParity(key, module, len(positions), m, worst))
    return out

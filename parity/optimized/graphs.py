"""Piecewise graphs of a decode step: each layer's per-token work replayed from a graph, the per-request work run as
it is.

In a decode step (one token per request after its context) every op of a layer has shapes fixed by the number of
tokens, except in the middle of the attention (`OptAttention.requests`: the compressor state machine, the indexer's
top-k over each context's entries, the index lists, the attention core, the ring write), whose widths follow the
contexts. The rest (mHC, norms, projections, RoPE, fake-quant, wo_a / wo_b, the whole MoE half) is a function of
the step's tokens alone: `OptBlock.tokens_in` / `tokens_out`. Each stretch between two middles (one layer's
`tokens_out` and the next layer's `tokens_in`) is captured once per (layer, op segments) and replayed afterwards,
which takes the host's per-op cost (Python and a launch per kernel: ~100-300 us per op call on the H200's host,
docs/perf.md) off most of a layer's ops. The middle stays eager; vLLM's piecewise CUDA graphs cut around the
attention the same way.

The buffer discipline, the same on every device: a piece's inputs are copied into its own static buffers before a
replay, except an input that was another piece's static output (or the step's token ids and positions, copied once
per step into buffers of their own) at capture time and is that same tensor again (the streams and mixes between
pieces; were it another tensor, it would be copied into that buffer, which no other piece reads after this one); a
replay returns the piece's static outputs, which its next replay overwrites, so the forward hands back a copy of the
last streams. A piece may read only its inputs: a tensor it reads from the capture-time batch (a closure) would be
replayed stale, and host values (the op segments) are part of its key. On a CUDA device a piece is a
`torch.cuda.CUDAGraph` (its own memory pool: no reasoning about which outputs another graph's intermediates may
reuse); elsewhere `_Rerun` calls the capture-time function again on the static inputs and copies the results into
the static outputs: the same discipline, so the CPU tests fail on a stale input or an aliasing mistake as a GPU
replay would.

Only steps in which every request is after its context use the pieces (decode steps, MTP verification chunks and
their replays; not prefills, not the speculative steps of chained drafts), at most `MAX_SHAPES` distinct op
segmentations per engine (each is captured once per layer: a step of another segmentation beyond them runs
eagerly), and only while no module of the model has forward hooks (dumps, teacher forcing and the reference's taps
are hooks, and a hook inside a captured piece would run once, at capture). Ops replaced after a capture (selftest's
planted bugs) are not seen by the replays: build the engine after them.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn.modules import module
from torch.utils._pytree import tree_flatten, tree_unflatten

from parity.errors import ParityError


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class _Rerun:
    """The CPU stand-in of a captured graph: calls the capture-time function on the static inputs (a CPU has no
    graphs; the same buffer discipline keeps the model's use of the pieces tested)."""

    def __init__(self, fn: Callable, inputs):
        self.fn, self.inputs = fn, inputs
        self.outputs = tree_map_clone(fn(*tree_map_clone(inputs)))  # like a capture: runs nothing on the inputs

    def replay(self) -> None:
        out_leaves, _ = tree_flatten(self.fn(*self.inputs))
        for static, value in zip(tree_flatten(self.outputs)[0], out_leaves):
            if static is not None:
                static.copy_(value)


def tree_map_clone(tree):
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([t if t is None else t.clone() for t in leaves], spec)  # None: a layer without the part


class _CudaGraph:
    """A CUDA graph of `fn` on static inputs; warmed up once on a side stream (Triton's compiling and autotuning,
    lazy workspaces) on copies of the inputs, since a piece may change its inputs in place."""

    def __init__(self, fn: Callable, inputs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*tree_map_clone(inputs))
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*inputs)

    def replay(self) -> None:
        self.graph.replay()


class _Piece:
    """One captured stretch; its inputs are a flat tuple of tensors (no tree walk per replay: the host's cost of a
    replay is the point of the pieces)."""

    def __init__(self, fn: Callable, args: tuple[torch.Tensor, ...], owned: list[torch.Tensor]):
        assert all(isinstance(t, torch.Tensor) for t in args), "graph piece inputs: a flat tuple of tensors"
        # an input that is another piece's static output is read in place; the rest get static buffers
        self.inputs = tuple(t if any(_same(t, o) for o in owned) else t.clone() for t in args)
        self.graph = (_CudaGraph if self.inputs[0].is_cuda else _Rerun)(fn, self.inputs)
        self.out_leaves = [t for t in tree_flatten(self.graph.outputs)[0] if t is not None]
        self.replays = 0

    def __call__(self, args: tuple[torch.Tensor, ...]):
        assert len(args) == len(self.inputs), "graph piece called with another number of inputs"
        for static, value in zip(self.inputs, args):
            # the same tensor object (a piece's output, the step's buffers) is read in place without a look
            if value is not static and not _same(static, value):
                static.copy_(value)
        self.graph.replay()
        self.replays += 1
        return self.graph.outputs


class DecodeGraphs:
    """The pieces of one model's decode steps, keyed by (layer, op segments); `forward` runs the layers with them."""

    # distinct op segmentations captured (each holds L + 1 graphs and their memory): a decode batch of B requests has
    # one; MTP verification adds one per pattern of draft counts, of which steady serving sees few
    MAX_SHAPES = 16

    def __init__(self):
        self.pieces: dict[tuple, _Piece] = {}
        self.step_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # op segments -> (tokens, positions)
        self._hook_dicts: tuple[nn.Module, list[dict]] | None = None

    def applies(self, model: nn.Module, batch) -> bool:
        """A step of requests all after their contexts, of a model without hooks, whose op segments are captured or
        may still be."""
        if batch.speculative or not all(s > 0 for s in batch.start_pos):
            return False
        known = batch.segments in self.step_inputs or len(self.step_inputs) < self.MAX_SHAPES
        return known and not self._hooked(model)

    def _hooked(self, model: nn.Module) -> bool:
        if module._global_forward_hooks or module._global_forward_pre_hooks:
            return True
        # the modules' hook dicts, listed once: walking `model.modules()` every step cost 5.9 ms at 43 layers (4,651
        # modules, this repo's CPU); hooks are added to these same dicts, so `any` over them sees new ones
        if self._hook_dicts is None or self._hook_dicts[0] is not model:
            dicts = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
            self._hook_dicts = (model, dicts)
        return any(self._hook_dicts[1])

    def forward(self, layers: nn.ModuleList, h: torch.Tensor, batch, cache) -> torch.Tensor:
        """h: [T, hc, D] embedded streams -> the last layer's streams (a copy), as `layer(h, batch, cache)` in turn."""
        seg = batch.segments
        # the step's token ids and positions, copied once into buffers every piece reads in place (a copy per piece
        # and layer otherwise: two launches per layer)
        tokens, positions = self.step_inputs.setdefault(seg, (batch.tokens.clone(), batch.positions.clone()))
        tokens.copy_(batch.tokens)
        positions.copy_(batch.positions)
        s = self._run(("in", 0, seg), partial(_first, layers[0], seg), (h, positions))
        for i, layer in enumerate(layers):
            o = layer.attn.requests(s.attn, batch, cache)
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            args = (o, s.residual, s.post, s.comb, s.attn.freqs, tokens, positions)
            s = self._run(("out", i, seg), partial(_between, layer, nxt, seg), args)
        return s.clone()

    def _run(self, key: tuple, fn: Callable, args: tuple):
        piece = self.pieces.get(key)
        if piece is None:
            owned = [t for p in self.pieces.values() for t in p.out_leaves]
            owned += [t for pair in self.step_inputs.values() for t in pair]
            try:
                piece = self.pieces[key] = _Piece(fn, args, owned)
            except RuntimeError as e:
                # no eager fallback: a failed capture can leave the device unusable (measured on the H200: the torch
                # backend's host-to-device copies failed a capture, and the next eager op hit an illegal address)
                raise ParityError(
                    f"EngineConfig.graphs: layer {key[1]}'s per-token ops cannot be captured in a CUDA graph ({e}); "
                    "graphs need ops that neither copy host tensors nor read device values on the host (the Triton "
                    "backend's; the torch backend's do not qualify): run without graphs"
                ) from e
        return piece(args)


def _first(layer, seg, h, positions):
    return layer.tokens_in(h, positions, seg)


def _between(layer, nxt, seg, o, residual, post, comb, freqs, tokens, positions):
    """One layer's work after its attention's middle, then the next layer's before its middle (the last layer: its
    output streams)."""
    h = layer.tokens_out(o, residual, post, comb, freqs, tokens, seg)
    return h if nxt is None else nxt.tokens_in(h, positions, seg)

"""Layer-streamed weights: a model whose blocks read their weights from the shards when they run and drop them when
another block runs, so a checkpoint larger than the box still runs, one block in memory at a time.

Why per forward and not layer-major (each layer loaded once, run for every request and step, then freed): a
verdict's targets are the reference's own greedy tokens, and a decode step's token needs every layer of the step
before it, so a layer-major reference cannot produce them. Streaming each block's weights inside the normal
forward keeps every run (targets, chained engine, reference, forced engine, golden) exactly as it is: the same
modules, the same caches and per-request state (buffers stay resident; they are activations, not weights), the
same kernels on the same bytes. The verdict is therefore identical to the non-streamed one by construction, and
the tests check it record for record (tests/stream/). The cost is reading: every forward of the model reads every
block once, so a run reads (forwards x blocks) blocks instead of one model (docs/perf.md has the measured times).

Streamed: `layers.i` and `mtp.j` (most of the model). Resident: the embedding, the final norm, the head and the
hc head (used at every step by the model and by the MTP blocks, which share them), and every buffer (KV caches,
compressor state, RoPE tables). At most one block's weights are held: the block about to run replaces the one
before (freed first, then read), and stays until the next one runs, because the optimized model reads an MTP
block's head parameters just after that block's forward returns. The parameter names, layout checks and disk ->
model conversions are the ones `build_model` uses (`parity.checkpoint`), so a streamed load is the same load.
"""

import ctypes
import math
import re
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from parity.checkpoint.convert import to_model_param
from parity.checkpoint.layout import disk_tensors_for_param
from parity.checkpoint.reader import Checkpoint
from parity.stream.memory import rss

BLOCK = re.compile(r"^(layers|mtp)\.\d+$")


@dataclass(frozen=True)
class _Slot:
    """One streamed parameter: where it lives in the module tree and what it is."""

    name: str  # full parameter name (= checkpoint name)
    owner: nn.Module
    leaf: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class StreamStats:
    """What streaming did: blocks read, bytes read into parameters, seconds spent reading."""

    loads: int = 0
    bytes: int = 0
    seconds: float = 0.0


# when a list: (block, event, perf_counter seconds, RSS bytes) appended at "load" (before the read), "run" (read,
# the forward starts) and "done" (the forward returned); bench/stream_rss.py times layers and follows RSS with it
TRACE: list | None = None

# every streamer of this process together (a verdict builds a model per run and per request): what `parity run`
# reports; `reset_totals()` when a measured span starts
TOTALS = StreamStats()


# every streamer whose model is alive: a run's model keeps its last block until it is collected, and the next run
# builds its model before the old one is dropped, so a new build first releases them all (`release_all`)
_LIVE: "weakref.WeakSet[Streamer]" = weakref.WeakSet()


def release_all() -> None:
    """Drop the weights every live streamed model holds (a model that runs again reads its block again)."""
    for streamer in list(_LIVE):
        streamer.release()


def reset_totals() -> None:
    TOTALS.loads, TOTALS.bytes, TOTALS.seconds = 0, 0, 0.0


class Streamer:
    """Forward pre-hooks on every block of `model` (built with its blocks on the meta device) that make the block
    resident before it runs (module docstring)."""

    def __init__(self, model: nn.Module, path, device: str | torch.device = "cpu"):
        self.ckpt, self.device = Checkpoint(path), torch.device(device)  # index and configs parsed once
        self.ckpt.close()  # parsing may open a shard (its header's dtypes): no map held between reads
        self.slots: dict[str, list[_Slot]] = {}
        self.hooks = []
        for name, block in model.named_modules():
            if BLOCK.match(name):
                self.slots[name] = block_slots(name, block)
                self.hooks.append(block.register_forward_pre_hook(lambda m, args, name=name: self.enter(name)))
                self.hooks.append(block.register_forward_hook(lambda m, a, out, name=name: self.done(name)))
        self.resident: str | None = None
        self.stats = StreamStats()
        _LIVE.add(self)

    def enter(self, name: str) -> None:
        if self.resident == name:
            _trace(name, "run")
            return
        _trace(name, "load")
        if self.resident is not None:
            self.release()
        t0, before = time.perf_counter(), self.stats.bytes
        ckpt = self.ckpt
        try:
            # inference tensors: the reference kernels' memo of decoded (float64) GEMM weights and the engine's weight
            # cache never keep them (they key on version counters, which inference tensors lack). A streamed weight
            # serves one forward per read, so a memo could only hold memory (up to PARITY_REF_CACHE_MB), never help
            with torch.inference_mode():
                for s in self.slots[name]:
                    value = read_param(ckpt, s.name, s.shape, s.dtype, self.device)
                    setattr(s.owner, s.leaf, nn.Parameter(value, requires_grad=False))
                    self.stats.bytes += value.numel() * value.element_size()
        finally:
            ckpt.close()
        trim()  # the conversions' temporaries
        self.resident = name
        for stats in (self.stats, TOTALS):
            stats.loads += 1
            stats.seconds += time.perf_counter() - t0
        TOTALS.bytes += self.stats.bytes - before
        _trace(name, "run")

    def done(self, name: str) -> None:
        # the forward's temporaries (dequantized weights, activations) are freed now: give the pages back, so the
        # next block's read reuses memory the OS counts once
        trim()
        _trace(name, "done")

    def release(self) -> None:
        """Drop the resident block's weights (back to the meta device) and hand the freed memory back to the OS."""
        if self.resident is None:
            return
        for s in self.slots[self.resident]:
            setattr(s.owner, s.leaf, nn.Parameter(torch.empty(s.shape, dtype=s.dtype, device="meta"), False))
        self.resident = None
        trim()

    def remove(self) -> None:
        self.release()
        for h in self.hooks:
            h.remove()
        self.hooks = []


def read_param(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """One parameter as the model holds it (the disk -> model conversion of `build_model`), in memory of its own.

    The shard is unmapped after each parameter: safetensors maps the whole shard, and every page a read touches
    counts in this process's RSS until the map is closed, so a block read with the shard open to the end would
    hold the block twice (its stored bytes and the converted parameters). Reopening costs a header parse."""
    try:
        disk = {spec.name: ckpt.read(spec) for spec in disk_tensors_for_param(name, shape, dtype)}
        # a copy of its own: a parameter that needs no conversion would otherwise keep the map (and its pages)
        value = to_model_param(name, disk, dtype).to(device, copy=False).clone()
        del disk  # the last references into the map, before it is closed
    finally:
        ckpt.close()
    return value


def block_slots(prefix: str, block: nn.Module) -> list[_Slot]:
    """Every parameter of a block that the checkpoint stores under the block's own name (an MTP block's shared
    embed/head are the model's, resident, and have no disk tensors of their own)."""
    out = []
    for module_name, module in block.named_modules(prefix=prefix):
        for leaf, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}"
            if p is not None and disk_tensors_for_param(name, tuple(p.shape), p.dtype):
                out.append(_Slot(name, module, leaf, tuple(p.shape), p.dtype))
    return out


def block_bytes(model: nn.Module) -> dict[str, int]:
    """Weight bytes of every streamed block as the model holds them (after the load's dtype conversions)."""
    return {
        name: sum(math.prod(s.shape) * s.dtype.itemsize for s in block_slots(name, block))
        for name, block in model.named_modules()
        if BLOCK.match(name)
    }


def _trace(name: str, event: str) -> None:
    if TRACE is not None:
        TRACE.append((name, event, time.perf_counter(), rss()))


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_ALLOCATOR_SET = False


def fixed_mmap_threshold(size: int = 1 << 20) -> None:
    """Serve every allocation of `size` bytes or more with its own mmap, returned to the OS when freed (glibc).

    glibc raises its mmap threshold to the size of each mmapped chunk freed (up to 32 MiB), after which tensors of
    up to that size come from the heap, where a freed one stays resident until a trim and blocks fragment; a run
    that frees one block's weights and reads the next, and frees a float64 copy of a weight per GEMM, then holds
    the freed memory besides what it uses. Setting the threshold fixes it (no more raising). Process-wide, once, by
    the first streamed model; a no-op where glibc is absent."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET or _LIBC is None:
        return
    try:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, size)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, size)
    except AttributeError:
        return
    _ALLOCATOR_SET = True


def trim() -> None:
    """glibc keeps freed heap memory for reuse; malloc_trim returns it, so RSS follows what the run holds. A no-op
    where glibc is absent."""
    try:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
    except AttributeError:
        pass

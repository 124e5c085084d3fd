"""`install(model, config) -> DumpHandle`: forward hooks that write selected modules' inputs/outputs to a dump dir.

Works on any `nn.Module` (ours, ATOM's, vLLM's, SGLang's): modules are picked by path regex, class name and layer
id, and the layer id comes from the module path (`layers.3.attn` -> 3). With dumping off not a single hook is
registered, so an instrumented model runs exactly as an uninstrumented one.
"""

import re
from collections import Counter
from itertools import chain

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from parity.dump.config import DumpConfig
from parity.dump.flatten import flatten, flatten_call
from parity.dump.format import MERGE_ATTR
from parity.dump.tags import Tags, current_tags
from parity.dump.writer import DumpWriter, Site
from parity.errors import ParityError


class DumpHandle:
    """What `install` returns: `remove()` takes every hook off again; also usable as a context manager."""

    def __init__(self, hooks: list[RemovableHandle], writer: DumpWriter | None, sites: list[Site]):
        self.hooks, self.writer, self.sites = hooks, writer, sites

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def dir(self):
        return None if self.writer is None else self.writer.dir

    def remove(self) -> None:
        """Take the hooks off, and wait for the background writer to put every queued record on disk."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "DumpHandle":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.remove()
            return
        try:  # the exception already on its way out is the one to report
            self.remove()
        except BaseException:  # noqa: BLE001
            pass


def install(
    model: nn.Module, config: DumpConfig | None = None, *, prefix: str = "", writer: DumpWriter | None = None
) -> DumpHandle:
    """Hook the modules of `model` that `config` selects (default: `DumpConfig.from_env()`).

    Call it once per model object, after weights are loaded. A model built later (an MTP drafter) is installed
    the same way into the same dir, with a `prefix` (e.g. `"mtp"`) that keeps its module paths apart: both then
    write one dump with one execution order. `writer` replaces the dir (a `MemoryWriter`, say): hooks are then
    installed whatever `config.dir` says.
    """
    config = DumpConfig.from_env() if config is None else config
    if not config.enabled and writer is None:
        return DumpHandle([], None, [])
    pattern = config.layer_pattern
    paths = [(".".join(p for p in (prefix, path) if p), m) for path, m in model.named_modules()]
    sites = [(Site(path, type(m).__name__, *layer_of(path, pattern), _merge(m)), m) for path, m in paths]
    sites = [(s, m) for s, m in sites if config.selects(s.path, s.cls, s.layer, s.block)]
    if not sites and not config.weights:
        raise ParityError(
            f"dump: no module of {type(model).__name__} matches PARITY_DUMP_MODULES={config.modules!r}, "
            f"PARITY_DUMP_CLASSES={','.join(sorted(config.classes))!r}, PARITY_DUMP_LAYERS={config.layers}"
        )
    # the hooks only snapshot and queue; a writer thread does the disk work (parity.dump.writer)
    writer = writer if writer is not None else DumpWriter(config.dir, config.mode, *_rank(), background=True)
    hooks = []
    for site, module in sites:
        tap = _Tap(site, writer, config)
        if config.what != "outputs":
            hooks.append(module.register_forward_pre_hook(tap.before, with_kwargs=True))
        if config.what != "inputs":
            hooks.append(module.register_forward_hook(tap.after, with_kwargs=True))
    if config.weights:
        dump_weights(model, writer, config, prefix)
    return DumpHandle(hooks, writer, [s for s, _ in sites])


def layer_of(path: str, pattern: re.Pattern) -> tuple[int | None, str | None]:
    """`model.layers.3.attn` -> `(3, "model.layers.3")`: the nearest enclosing layer index and its block path."""
    matches = list(pattern.finditer(path))
    if not matches:
        return None, None
    return int(matches[-1][1]), path[: matches[-1].end()]


def dump_weights(model: nn.Module, writer: DumpWriter, config: DumpConfig, prefix: str = "") -> None:
    """Write parameters and buffers (one file per layer block), filtered by `layers` and the `modules` regex."""
    pattern = config.layer_pattern
    groups: dict[str, dict] = {}
    owners = {".".join(p for p in (prefix, path) if p): m for path, m in model.named_modules()}
    tensors = chain(model.named_parameters(prefix=prefix), model.named_buffers(prefix=prefix))
    for name, t in tensors:
        layer, block = layer_of(name, pattern)
        if config.layers is not None and layer not in config.layers:
            continue
        if config.modules is not None and re.search(config.modules, name) is None:
            continue
        owner = name.rpartition(".")[0]
        site = Site(owner, type(owners[owner]).__name__, layer, block, _merge(owners[owner]))
        groups.setdefault(block or "", {})[name] = (t, site)
    for block, tensors in groups.items():
        writer.write_weights(block, tensors)


class _Tap:
    """The hooks of one module, with its call counters (total, and per phase/step)."""

    def __init__(self, site: Site, writer: DumpWriter, config: DumpConfig):
        self.site, self.writer, self.config = site, writer, config
        self.calls = 0
        self.calls_in_step: Counter = Counter()
        # (call, call_in_step) numbered in the pre-hook and used by the post-hook when both are registered
        self.open: list[tuple[int, int]] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _capturing():
            return
        tags = current_tags()
        numbers = self._number(tags)
        if self.config.what == "both":
            self.open.append(numbers)
        self._write(tags, "input", numbers, lambda: flatten_call(args, kwargs))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if _capturing():
            return
        tags = current_tags()
        numbers = self.open.pop() if self.config.what == "both" else self._number(tags)
        self._write(tags, "output", numbers, lambda: flatten(output, "out"))

    def _number(self, tags: Tags) -> tuple[int, int]:
        call, key = self.calls, (tags.phase, tags.step)
        in_step = self.calls_in_step[key]
        self.calls += 1
        self.calls_in_step[key] += 1
        return call, in_step

    def _write(self, tags: Tags, io: str, numbers: tuple[int, int], tensors) -> None:
        call, in_step = numbers
        if self.config.wants(call, tags.phase, tags.step):
            self.writer.write_activation(self.site, tags, call, in_step, io, tensors())


def _merge(module: nn.Module):
    """How the module's records merge across tensor-parallel ranks, if it declares it (`format.MERGE_ATTR`)."""
    return getattr(module, MERGE_ATTR, None)


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _capturing() -> bool:
    # hooks cannot copy to host while a CUDA graph is being captured, and replays never call them: skip capture
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

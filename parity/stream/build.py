"""Build a model whose blocks stream their weights (`parity.stream.weights`): the resident parts (embedding, final
norm, head, hc head) are read once per process and shared by every streamed model built from the same checkpoint
while any of them is alive, every block's buffers (caches, state, RoPE tables) are allocated and reset, and every
block's parameters stay on the meta device until the block runs.

Why shared: a verdict builds one model per request and per run (targets, chained engine, reference, forced engine),
and the caller still holds the previous model while the next one is built (and a model whose last block sits in a
reference cycle lives until the next collection), so resident weights loaded per model would be held twice at
those moments: with V4's real vocabulary, 3 GiB more. The models only read them (nothing in a run writes a weight
in place), so one copy serves all; each is keyed on everything its value depends on (checkpoint, shard file
state, name, shape, dtype, device), so the reference's fp32 head and a model holding it in another dtype never mix.
"""

import gc
import os
import re
import weakref

import torch
from torch import nn

from parity.checkpoint import Checkpoint, Selection, build_model
from parity.checkpoint.layout import disk_tensors_for_param
from parity.checkpoint.reader import refuse_unread
from parity.stream.weights import Streamer, fixed_mmap_threshold, read_param, release_all, trim

_STREAMED = re.compile(r"^(layers|mtp)\.\d+(\.|$)")  # a block or a module inside one
# resident parameters shared by the streamed models alive in this process (dropped with the last model using one)
_RESIDENT: "weakref.WeakValueDictionary[tuple, nn.Parameter]" = weakref.WeakValueDictionary()


def _shard_state(ckpt: Checkpoint, names) -> tuple:
    out = []
    for n in names:
        file = ckpt.path / ckpt.weight_map.get(n, "")
        try:
            st = os.stat(file)
            out.append((str(file), st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((str(file), None))
    return tuple(out)


def _load_resident(model: nn.Module, ckpt: Checkpoint, device: torch.device) -> None:
    """Every parameter outside the blocks: the shared copy when one is alive, else read (as `build_model` reads it:
    the same layout checks and conversions) and shared from then on."""
    read: set[str] = set()
    for module_name, module in model.named_modules():
        if _STREAMED.match(module_name):
            continue  # streamed (an MTP block's embed/head are the model's: linked after)
        for leaf, p in list(module.named_parameters(recurse=False)):
            name = f"{module_name}.{leaf}" if module_name else leaf
            specs = disk_tensors_for_param(name, tuple(p.shape), p.dtype)
            if not specs:
                continue
            disk_names = [s.name for s in specs]
            read.update(disk_names)
            key = (str(ckpt.path.resolve()), _shard_state(ckpt, disk_names), name, tuple(p.shape), p.dtype, device,
                   p.requires_grad)  # fmt: skip
            shared = _RESIDENT.get(key)
            if shared is None:
                with torch.no_grad():
                    value = read_param(ckpt, name, tuple(p.shape), p.dtype, device)
                shared = nn.Parameter(value, requires_grad=p.requires_grad)
                _RESIDENT[key] = shared
            setattr(module, leaf, shared)
    # as `load_params`: a tensor the index lists under a resident part that no parameter reads is refused
    refuse_unread(ckpt, ("embed.", "norm.", "head.", "hc_head_"), read)


def build_streamed(path, device: str | torch.device = "cpu", factory=None, overrides=None):
    """`build_model(path, ...)` with streamed blocks; returns `(model, args)`. `model.streamer` holds the hooks and
    what they read (`StreamStats`)."""
    fixed_mmap_threshold()
    # the models of earlier runs keep their last block read (still referenced while this one is built, or sitting
    # in reference cycles of hooks and tap wrappers): release every block and collect them first, or each run would
    # hold one more block
    release_all()
    gc.collect()
    trim()
    device = torch.device(device)
    # nothing loaded: every parameter and buffer on the meta device
    model, args = build_model(path, Selection(layers=[], mtp=False, embed_head=False), device, factory,
                              overrides=overrides)  # fmt: skip
    for module in model.modules():
        for leaf, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                setattr(module, leaf, torch.empty_like(buf, device=device))
    for module in model.modules():
        if module is not model and hasattr(module, "reset_buffers"):
            module.reset_buffers()
    ckpt = Checkpoint(path)
    try:
        _load_resident(model, ckpt, device)
    finally:
        ckpt.close()
    # the MTP blocks share the model's embedding and head (resident), as build_model links them
    for block in model.mtp:
        block.embed, block.head = model.embed, model.head
    model.streamer = Streamer(model, path, device)
    return model, args

"""Build a model whose blocks stream their weights (`parity.stream.weights`): the resident parts (embedding, final
norm, head, hc head) are loaded as `build_model` loads them, every block's buffers (caches, state, RoPE tables) are
allocated and reset, and every block's parameters stay on the meta device until the block runs."""

import gc

import torch

from parity.checkpoint import Selection, build_model
from parity.stream.weights import BLOCK, Streamer, release_all, trim


def build_streamed(path, device: str | torch.device = "cpu", factory=None, overrides=None):
    """`build_model(path, ...)` with streamed blocks; returns `(model, args)`. `model.streamer` holds the hooks and
    what they read (`StreamStats`)."""
    # the models of earlier runs keep their last block read (still referenced while this one is built, or sitting
    # in reference cycles of hooks and tap wrappers): release every block and collect them first, or each run would
    # hold one more block
    release_all()
    gc.collect()
    trim()
    model, args = build_model(path, Selection(layers=[], mtp=False), device, factory, overrides=overrides)
    for name, block in model.named_modules():
        if not BLOCK.match(name):
            continue
        for module in block.modules():
            for leaf, buf in list(module.named_buffers(recurse=False)):
                if buf.is_meta:
                    setattr(module, leaf, torch.empty_like(buf, device=device))
        for module in block.modules():
            if module is not block and hasattr(module, "reset_buffers"):
                module.reset_buffers()
    # the MTP blocks share the model's embedding and head (resident), as build_model links them
    for block in model.mtp:
        block.embed, block.head = model.embed, model.head
    model.streamer = Streamer(model, path, device)
    return model, args

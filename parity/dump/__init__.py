"""Env-gated per-layer dumps from any torch model.

    from parity import dump
    handle = dump.install(model)                 # reads PARITY_DUMP_* (docs/ENVS.md); no hooks when unset
    with dump.phase("prefill", step=0, cu_seqlens=[0, 5, 9]):
        model(tokens)
    handle.remove()

Depends only on torch, safetensors and `nn.Module` names; the file format is in `parity.dump.format`.
"""

from parity.dump.config import DumpConfig, Ranges
from parity.dump.format import PHASES, SCHEMA_VERSION, Record
from parity.dump.hooks import DumpHandle, install, layer_of
from parity.dump.tags import Tags, current_tags, phase, tags
from parity.dump.writer import DumpWriter, MemoryWriter

__all__ = [
    "PHASES",
    "SCHEMA_VERSION",
    "DumpConfig",
    "DumpHandle",
    "DumpWriter",
    "MemoryWriter",
    "Ranges",
    "Record",
    "Tags",
    "current_tags",
    "install",
    "layer_of",
    "phase",
    "tags",
]

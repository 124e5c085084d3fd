"""Write a synthetic checkpoint in the exact official Hugging Face layout.

Output directory:
    config.json                        HF-style root config
    inference/config.json              the ModelArgs keys the official generate.py reads
    model.safetensors.index.json       {"metadata": {"total_size": bytes}, "weight_map": {name: shard file}}
    model-0000i-of-0000n.safetensors   shards: embed | layer 0 | ... | layer n-1 | norm/head/hc_head | mtp
    parity_synth.json                  parity-only sidecar: {"seed": .., "init": ..} the weights were drawn with
Shards are generated and written one at a time (memory ~ one shard), each atomically. The sidecar is not part of
the official layout; readers that follow the index (the official loader, `Checkpoint`) never open it.
"""

import os
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from parity.checkpoint.layout import INDEX_FILE, hf_root_config, model_param_specs, n_shards, shard_file, shard_index
from parity.checkpoint.synth import check_init, synth_param
from parity.config import ModelArgs
from parity.errors import ParityError
from parity.io import atomic_write, atomic_write_json

SYNTH_FILE = "parity_synth.json"


def write_checkpoint(path: str | os.PathLike, args: ModelArgs, seed: int = 0, init: str = "chaotic") -> Path:
    """Write a random checkpoint for `args` to `path` and return the path. `init` picks the weight distribution
    (`parity.checkpoint.synth`: "chaotic" or "calm")."""
    check_init(init)
    path = Path(path)
    specs = model_param_specs(args)
    _check_room(path, args, specs)
    # written last, like a completion mark: a rewrite that dies half-way must not keep claiming the old draw
    (path / SYNTH_FILE).unlink(missing_ok=True)
    total = n_shards(args)
    by_shard: dict[int, list[tuple[str, tuple, torch.dtype]]] = defaultdict(list)
    for name, (shape, dtype) in specs.items():
        by_shard[shard_index(name, args)].append((name, shape, dtype))

    weight_map: dict[str, str] = {}
    total_size = 0
    for index in range(1, total + 1):
        tensors: dict[str, torch.Tensor] = {}
        for name, shape, dtype in by_shard.get(index, []):
            tensors.update(synth_param(name, shape, dtype, args, seed, init))
        file = shard_file(index, total)
        for name, t in tensors.items():
            weight_map[name] = file
            total_size += t.numel() * t.element_size()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(path / file, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": "pt"}))

    atomic_write_json(path / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})
    atomic_write_json(path / "config.json", hf_root_config(args))
    atomic_write_json(path / "inference" / "config.json", args.official_dict())
    atomic_write_json(path / SYNTH_FILE, {"seed": seed, "init": init})
    return path


def _check_room(path: Path, args: ModelArgs, specs: dict) -> None:
    """Refuse, before anything is written, a checkpoint that cannot fit: its bytes on the disk under `path`, its
    largest shard (generated whole) in this machine's memory. A model of absurd sizes is one line, not an allocator
    error or a full disk half-way."""
    shards: dict[int, int] = defaultdict(int)
    biggest = (0, "", ())
    for name, (shape, dtype) in specs.items():
        numel = 1
        for n in shape:
            numel *= n
        size = numel * torch.empty((), dtype=dtype).element_size()
        shards[shard_index(name, args)] += size
        biggest = max(biggest, (size, name, tuple(shape)))
    total, largest = sum(shards.values()), max(shards.values(), default=0)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # the write itself names the problem
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    what = f"(largest tensor {biggest[1]} {list(biggest[2])}: check the model's sizes)"
    if total > free:
        raise ParityError(
            f"{path}: the synthetic checkpoint of this model needs {_gb(total)}, {existing} has {_gb(free)} free {what}"
        )
    if memory and largest > memory:
        raise ParityError(
            f"{path}: a shard of this model's synthetic checkpoint needs {_gb(largest)} in memory, this machine has "
            f"{_gb(memory)} {what}"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"

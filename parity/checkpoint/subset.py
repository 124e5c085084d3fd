"""A model made of some layers of a checkpoint (`[model] layers = [...]` in a case): layers l0 < l1 < ... of the
checkpoint become layers 0, 1, ... of a smaller model with the same embedding, head and MTP blocks.

Nothing is copied: the subset is a small directory (index + configs) whose index points at the original shards by
absolute path and maps each tensor name of the smaller model to the name stored there (`parity_stored_names`, read
by `Checkpoint`). Each kept layer keeps what makes it that layer: its compress ratio (SWA / CSA / HCA) and whether
it routes by hash (the hash layers are the first `n_hash_layers`, so in an ascending selection they stay a prefix).
Every run (reference, engine, streamed or not) then reads the subset like any checkpoint.
"""

import re
from collections.abc import Sequence
from pathlib import Path

from parity.checkpoint.layout import INDEX_FILE
from parity.config import ModelArgs
from parity.errors import ParityError
from parity.io import atomic_write_json

STORED_NAMES = "parity_stored_names"  # index key: {name in the subset model: name stored in the shard}
_LAYER = re.compile(r"^layers\.(\d+)\.")


def check_layers(layers, n_layers: int, where: str) -> tuple[int, ...]:
    """A non-empty ascending list of distinct layer indices below `n_layers`, or one line naming `where`."""
    ok = isinstance(layers, list) and layers and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    if not ok:
        raise ParityError(f"{where} must be a non-empty list of layer indices, got {layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ParityError(f"{where} must be ascending without repeats (the model runs them in order), got {layers}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ParityError(f"{where}: layer {bad[0]} does not exist (the model has layers 0..{n_layers - 1})")
    return tuple(layers)


def subset_args(args: ModelArgs, layers: Sequence[int]) -> ModelArgs:
    """The config of the model made of `layers` (ascending) of `args`' model, with its MTP blocks."""
    mtp = list(args.compress_ratios[args.n_layers : args.n_layers + args.n_mtp_layers])
    return args.with_(
        n_layers=len(layers),
        n_hash_layers=sum(1 for i in layers if i < args.n_hash_layers),
        compress_ratios=[args.compress_ratios[i] for i in layers] + mtp,
        source="[model] layers",
    )


def write_subset(src: str | Path, layers: Sequence[int], out: str | Path, args: ModelArgs) -> Path:
    """Write the subset checkpoint dir `out` for `layers` of the checkpoint at `src` (whose config is `args`)."""
    from parity.checkpoint.reader import Checkpoint

    src, out = Path(src).resolve(), Path(out)
    ckpt = Checkpoint(src)
    rename = {f"layers.{old}.": f"layers.{new}." for new, old in enumerate(layers)}
    weight_map, stored = {}, {}
    for name, file in ckpt.weight_map.items():
        m = _LAYER.match(name)
        if m is not None:
            prefix = m.group(0)
            if prefix not in rename:
                continue
            new = rename[prefix] + name[len(prefix) :]
        else:
            new = name
        weight_map[new] = str(src / file)
        stored[new] = ckpt.stored_names.get(name, name)
    sub = subset_args(args, layers)
    atomic_write_json(out / INDEX_FILE, {"metadata": {"subset_of": str(src), "layers": list(layers)},
                                         "weight_map": weight_map, STORED_NAMES: stored})  # fmt: skip
    atomic_write_json(out / "inference" / "config.json", sub.official_dict())
    return out

"""Lazy reader for sharded V4 checkpoints: load only the tensors of the selected layers into the reference model.

The model is built on the meta device; only the selected submodules (`layers.i`, `mtp`, embed/head) are
materialized and filled, one parameter at a time, so peak memory is proportional to what is selected. Every
tensor is checked against the layout derived from `ModelArgs` (name, shape, dtype) before it is used, and must
hold finite numbers: a NaN weight is a broken checkpoint, refused before a run would carry it into every row.
"""

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from parity.checkpoint import experts
from parity.checkpoint.convert import to_model_param
from parity.checkpoint.layout import INDEX_FILE, DiskTensor, disk_tensors_for_param
from parity.checkpoint.subset import STORED_NAMES
from parity.config import ModelArgs
from parity.errors import ParityError

# safetensors header dtype strings
_ST_DTYPE = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e8m0fnu: "F8_E8M0",
    torch.int8: "I8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.uint8: "U8",
}


class Checkpoint:
    """A sharded checkpoint directory (index + shards + inference/config.json), opened lazily."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not self.path.is_dir():
            what = "is not a directory" if self.path.exists() else "does not exist"
            raise ParityError(f"{self.path}: checkpoint directory {what}")
        if not index_path.is_file():
            raise ParityError(f"{index_path}: missing (not a sharded Hugging Face checkpoint)")
        try:
            index = json.loads(index_path.read_bytes().decode("utf-8"))
        except OSError as e:
            raise ParityError(f"{index_path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ParityError(f"{index_path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ParityError(f"{index_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ParityError(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
        self.weight_map: dict[str, str] = weight_map
        # a layer subset (`checkpoint.subset`) names tensors by their place in the smaller model; shards keep theirs
        stored = index.get(STORED_NAMES) or {}
        if not isinstance(stored, dict) or not all(isinstance(v, str) for v in stored.values()):
            raise ParityError(f"{index_path}: {STORED_NAMES!r} must map tensor names to stored names")
        self.stored_names: dict[str, str] = stored
        self.config_path = self.path / "inference" / "config.json"
        self._handles: dict[str, object] = {}
        self._keys: dict[str, set[str]] = {}
        self._finite: set[str] = set()
        # FP8 (V4-Flash-Base) or FP4 routed experts: what the shards hold wins over a stale inference config
        self.args = experts.resolve(
            ModelArgs.from_json(self.config_path), self.path / "config.json", weight_map, self._header_dtype
        )

    def check_model(self, want: ModelArgs, asker: str) -> None:
        """Refuse this checkpoint for `asker` (e.g. a case) when its config describes another model: one line naming
        the first differing key, the value each side holds, and whether config.json sets the key at all."""
        theirs, ours = self.args.official_dict(), want.official_dict()
        # expert_dtype None and "fp8" are the same model under dtype "fp8": compare what the experts hold
        theirs["expert_dtype"], ours["expert_dtype"] = self.args.expert_format, want.expert_format
        differ = [k for k in ours if theirs.get(k) != ours[k]]
        if not differ:
            return
        key = differ[0]
        present = json.loads(self.config_path.read_bytes().decode("utf-8"))  # parsed fine just before
        has = f"has {theirs[key]!r}" if key in present else f"does not set it (default {theirs[key]!r})"
        more = f" ({len(differ)} keys differ: {', '.join(differ[:6])}{', ...' if len(differ) > 6 else ''})"
        raise ParityError(
            f"{asker} asks for model {key}={ours[key]!r} but {self.config_path} {has}"
            f"{more if len(differ) > 1 else ''}: the checkpoint is of another model"
        )

    def _shard(self, file: str):
        if file not in self._handles:
            shard = self.path / file
            if not shard.is_file():
                raise ParityError(f"{shard}: shard listed in {INDEX_FILE} is missing")
            try:
                self._handles[file] = safe_open(str(shard), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise ParityError(
                    f"{shard}: unreadable safetensors file ({_first_line(e)}), listed in {self.path / INDEX_FILE}"
                ) from None
        return self._handles[file]

    def header_shape(self, name: str) -> list[int]:
        """The shape tensor `name` has in its shard's header (no data read)."""
        return list(self._shard(self.weight_map[name]).get_slice(self.stored_names.get(name, name)).get_shape())

    def _header_dtype(self, name: str) -> str:
        return self._shard(self.weight_map[name]).get_slice(self.stored_names.get(name, name)).get_dtype()

    def close(self) -> None:
        self._handles.clear()
        self._keys.clear()

    def _locate(self, spec: DiskTensor):
        file = self.weight_map.get(spec.name)
        if file is None:
            raise ParityError(
                f"{self.path}: tensor {spec.name!r} is missing from {INDEX_FILE} "
                f"(expected shape {list(spec.shape)} {_ST_DTYPE.get(spec.dtype, spec.dtype)})"
            )
        handle = self._shard(file)
        if file not in self._keys:  # handle.keys() builds a list per call: a set once per shard
            self._keys[file] = set(handle.keys())
        if self.stored_names.get(spec.name, spec.name) not in self._keys[file]:
            raise ParityError(f"{self.path / file}: tensor {spec.name!r} is listed in {INDEX_FILE} but not stored")
        return file, handle

    def check(self, spec: DiskTensor) -> None:
        """Compare a tensor's header (shape, dtype) with the layout, without reading its data."""
        file, handle = self._locate(spec)
        sl = handle.get_slice(self.stored_names.get(spec.name, spec.name))
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        want = _ST_DTYPE.get(spec.dtype, str(spec.dtype))
        if shape != spec.shape or dtype != want:
            raise ParityError(
                f"{self.path / file}: tensor {spec.name!r} is {list(shape)} {dtype}, expected {list(spec.shape)} {want}"
            )

    def read(self, spec: DiskTensor) -> torch.Tensor:
        self.check(spec)
        file, handle = self._locate(spec)
        try:
            t = handle.get_tensor(self.stored_names.get(spec.name, spec.name))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ParityError(f"{self.path / file}: cannot read tensor {spec.name!r} ({_first_line(e)})") from None
        bad = 0 if spec.name in self._finite else _non_finite(t)
        self._finite.add(spec.name)  # scanned once per Checkpoint: a streamed run reads a layer per forward
        if bad:
            raise ParityError(
                f"{self.path / file}: tensor {spec.name!r} holds {bad} NaN/Inf of {t.numel()} values: "
                f"expected finite weights"
            )
        return t


def _non_finite(t: torch.Tensor) -> int:
    """How many NaN/Inf a stored tensor holds. The FP8 formats are read through their bytes (no 4x float copy of
    the largest weights): e4m3fn has no Inf and NaN is S.1111.111; e8m0 has NaN 0xFF only. Integer and packed
    fp4 tensors have none."""
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if t.dtype == torch.float8_e8m0fnu:
        return int((t.view(torch.uint8) == 0xFF).sum())
    if not t.is_floating_point() or t.dtype == torch.float4_e2m1fn_x2:
        return 0
    x = t.float() if t.element_size() == 1 else t  # e5m2 and other 1-byte floats
    return int(x.numel() - torch.isfinite(x).sum())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


@dataclass(frozen=True)
class Selection:
    """Which parts of the model to materialize and load. `layers=None` means all main layers."""

    layers: Sequence[int] | None = None
    mtp: bool = True
    embed_head: bool = True

    def prefixes(self, args: ModelArgs) -> list[str]:
        layers = range(args.n_layers) if self.layers is None else self.layers
        for i in layers:
            if not 0 <= i < args.n_layers:
                raise ParityError(f"layer {i} does not exist (the checkpoint has layers 0..{args.n_layers - 1})")
        prefixes = [f"layers.{i}." for i in layers]
        # the MTP blocks share the main embedding and head
        if self.embed_head or self.mtp:
            prefixes += ["embed.", "norm.", "head.", "hc_head_"]
        if self.mtp:
            prefixes.append("mtp.")
        return prefixes


def _selected(name: str, prefixes: Iterable[str]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def load_params(model: torch.nn.Module, ckpt: Checkpoint, prefixes: Sequence[str]) -> list[str]:
    """Copy every selected parameter from the checkpoint into `model` (already materialized); returns the names.

    A model that is one rank of a tensor-parallel group holds slices of some parameters; it says so with a
    `weight_shard` attribute (`parity.optimized.parallel.TP`): the whole tensor is read and checked against the
    layout at its full shape (`full_shape`), converted, and the rank's slice (`narrow`) is kept."""
    shard = getattr(model, "weight_shard", None)
    loaded = []
    read: set[str] = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, param in params.items():
            if not _selected(name, prefixes):
                continue
            shape = tuple(param.shape) if shard is None else shard.full_shape(name, tuple(param.shape))
            disk_specs = disk_tensors_for_param(name, shape, param.dtype)
            if not disk_specs:
                continue  # mtp.N.embed/head: the shared modules, loaded under their own names
            disk = {spec.name: ckpt.read(spec) for spec in disk_specs}
            read.update(disk)
            value = to_model_param(name, disk, param.dtype)
            param.copy_(value if shard is None else shard.narrow(name, value))
            loaded.append(name)
    # a tensor-parallel rank holds only its own experts, so it reads a part of each layer by design: the
    # one-process load of the same checkpoint is where the check is made
    if shard is None:
        refuse_unread(ckpt, prefixes, read)
    return loaded


def refuse_unread(ckpt: Checkpoint, prefixes: Iterable[str], read: set[str]) -> None:
    """A tensor the index lists under a loaded part (`prefixes`) that no parameter read (`read`) is a checkpoint of
    another model, or a misspelt name whose real tensor is then missing: as the official loader's strict load,
    refuse it."""
    unread = sorted(n for n in ckpt.weight_map if _selected(n, prefixes) and n not in read)
    if unread:
        more = f" (and {len(unread) - 1} more)" if len(unread) > 1 else ""
        raise ParityError(f"{ckpt.path / INDEX_FILE}: tensor {unread[0]!r}{more} is not a parameter of the model")


def _materialize(model: torch.nn.Module, prefixes: Sequence[str], device) -> None:
    """Allocate (uninitialized) storage on `device` for every selected meta parameter and buffer."""
    for module_name, module in model.named_modules():
        direct = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for leaf, tensor in direct:
            full = f"{module_name}.{leaf}" if module_name else leaf
            if tensor.is_meta and _selected(full, prefixes):
                new = torch.empty_like(tensor, device=device)
                if isinstance(tensor, torch.nn.Parameter):
                    setattr(module, leaf, torch.nn.Parameter(new, requires_grad=tensor.requires_grad))
                else:
                    setattr(module, leaf, new)


def build_model(
    path: str | os.PathLike,
    selection: Selection = Selection(),
    device: str | torch.device = "cpu",
    factory=None,
    *,
    overrides: Mapping[str, object] | None = None,
):
    """Build a model for a checkpoint and load only `selection` into it.

    `factory(args)` builds the model (default: the reference `Transformer`; any model with the same parameter names
    works, e.g. the optimized one). Unselected layers stay on the meta device (no memory); run selected layers
    directly (`model.layers[i]`). `overrides` (field name -> value) replace the checkpoint's ModelArgs fields, e.g.
    `{"revision": "initial"}`; an unknown name or a value of the wrong type is refused (`ModelArgs.with_`).
    Returns `(model, args)`.
    """
    if factory is None:
        from parity.reference.model import Transformer as factory

    ckpt = Checkpoint(path)
    args = ckpt.args.with_(overrides or {}, source=f"build_model({ckpt.path}) overrides")
    prefixes = selection.prefixes(args)
    with torch.device("meta"):
        model = factory(args)
    _materialize(model, prefixes, device)
    # the MTP blocks hold the shared embed/head as submodules: re-link after materializing
    for block in model.mtp:
        block.embed, block.head = model.embed, model.head
    try:
        load_params(model, ckpt, prefixes)
    finally:
        ckpt.close()
    for name, module in model.named_modules():
        if module is not model and hasattr(module, "reset_buffers") and _selected(name + ".", prefixes):
            module.reset_buffers()
    return model, args

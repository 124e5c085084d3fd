"""An op call's arguments as safetensors plus a JSON spec, and back.

Op arguments are tensors, tuples and lists of them, scalars, dtypes, strings, None and frozen dataclasses (the MoE's
`ExpertWeights`). `encode` turns such a value into a JSON-able spec whose tensors are named entries of one flat
dict (what `safetensors.torch.save_file` writes); `decode` rebuilds the value from the spec and the loaded tensors.
Tensors are saved contiguous, on the CPU, bit for bit (safetensors stores every dtype an op takes, float8 and
complex included). Strides are not kept: a kernel whose bug depends on a strided view (the in-place RoPE on
`q[..., -rd:]`) is replayed on a contiguous copy, and may then pass (the script says whether the replay gave
the run's own output).
"""

import dataclasses
import importlib

import torch

from parity.errors import ParityError


def encode(value, tensors: dict[str, torch.Tensor], name: str):
    """The spec of `value`; its tensors are added to `tensors` under keys starting with `name`."""
    if isinstance(value, torch.Tensor):
        key = name
        tensors[key] = value.detach().to("cpu").clone().contiguous()
        return {"tensor": key, "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    if isinstance(value, tuple | list):
        kind = "tuple" if isinstance(value, tuple) else "list"
        return {kind: [encode(v, tensors, f"{name}.{i}") for i, v in enumerate(value)]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {
            f.name: encode(getattr(value, f.name), tensors, f"{name}.{f.name}") for f in dataclasses.fields(value)
        }
        return {"dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    raise ParityError(f"{name}: cannot save an op argument of type {type(value).__name__}")


def decode(spec: dict, tensors: dict[str, torch.Tensor], device: str = "cpu"):
    """The value `spec` describes, its tensors taken from `tensors` (fresh copies on `device`)."""
    if "tensor" in spec:
        key = spec["tensor"]
        if key not in tensors:
            raise ParityError(f"tensor {key!r}: named by the repro's JSON but missing from its safetensors file")
        t = tensors[key]
        if str(t.dtype) != spec["dtype"] or list(t.shape) != spec["shape"]:
            raise ParityError(
                f"tensor {key!r}: expected {spec['dtype']} {spec['shape']}, found {t.dtype} {list(t.shape)}"
            )
        return t.clone().to(device)
    if "dtype" in spec:
        return getattr(torch, spec["dtype"])
    if "value" in spec:
        return spec["value"]
    if "tuple" in spec:
        return tuple(decode(s, tensors, device) for s in spec["tuple"])
    if "list" in spec:
        return [decode(s, tensors, device) for s in spec["list"]]
    if "dataclass" in spec:
        module, _, qualname = spec["dataclass"].partition(":")
        try:
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError):
            raise ParityError(f"repro JSON: dataclass {spec['dataclass']!r} cannot be imported") from None
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise ParityError(f"repro JSON: {spec['dataclass']!r} is not a dataclass")
        return cls(**{k: decode(s, tensors, device) for k, s in spec["fields"].items()})
    raise ParityError(f"repro JSON: unknown argument spec {sorted(spec)}")


def check_spec(spec, where: str) -> None:
    """Refuse, with one line naming `where`, an argument spec `decode` could not rebuild: an unknown form, a dtype
    torch does not have, a shape that is not a list of sizes, or a dataclass outside the `parity` package (a repro
    JSON never makes the harness import and call anything else)."""
    if not isinstance(spec, dict):
        raise ParityError(f"{where}: expected an argument spec (an object), found {type(spec).__name__}")
    if "tensor" in spec:
        dtype, shape = spec.get("dtype"), spec.get("shape")
        ok_shape = isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                   for n in shape)  # fmt: skip
        if not isinstance(spec["tensor"], str) or not _is_dtype(str(dtype).removeprefix("torch.")) or not ok_shape:
            raise ParityError(f"{where}: expected a tensor spec (tensor name, torch dtype, shape), found {spec}"[:300])
    elif "dtype" in spec:
        if not _is_dtype(spec["dtype"]):
            raise ParityError(f"{where}: dtype {spec['dtype']!r} is not a torch dtype")
    elif "value" in spec:
        if spec["value"] is not None and not isinstance(spec["value"], bool | int | float | str):
            raise ParityError(f"{where}: value must be a number, string, boolean or null, found {spec['value']!r}")
    elif "tuple" in spec or "list" in spec:
        items = spec.get("tuple", spec.get("list"))
        if not isinstance(items, list):
            raise ParityError(f"{where}: expected a list of argument specs, found {type(items).__name__}")
        for i, s in enumerate(items):
            check_spec(s, f"{where}.{i}")
    elif "dataclass" in spec:
        name, fields = spec["dataclass"], spec.get("fields")
        if not isinstance(name, str) or not name.startswith("parity.") or ":" not in name:
            raise ParityError(f"{where}: dataclass {name!r}: expected a 'parity.<module>:<class>' of the harness")
        if not isinstance(fields, dict):
            raise ParityError(f"{where}: dataclass {name}: expected an object of fields")
        for k, s in fields.items():
            check_spec(s, f"{where}.{k}")
    else:
        raise ParityError(f"{where}: unknown argument spec {sorted(spec)}")


def _is_dtype(name) -> bool:
    return isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype)


def nbytes(value) -> int:
    """The bytes of every tensor in an op argument (what recording it costs)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(nbytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


def clone(value):
    """A deep copy of an op argument's tensors (ops may work in place: the recorded inputs are the ones before)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple | list):
        return type(value)(clone(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: clone(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value

"""Flatten what a module takes or returns (tensors, tuples, dicts, dataclasses, state objects) into named tensors.

Names are stable across runs because they follow the structure, not object ids: `out`, `out.0`, `out.1.hidden`,
`in.0`, `in.positions`. Non-tensor leaves (ints, None, strings) and private (`_`-prefixed) attributes are dropped.
"""

import dataclasses
import types

import torch
from torch import nn

# deep enough for (hidden, residual, state.field) outputs; bounds the walk over arbitrary objects
MAX_DEPTH = 6


def flatten(obj: object, prefix: str) -> dict[str, torch.Tensor]:
    """`(x, (y, None), {"z": w})` under prefix `out` -> `{"out.0": x, "out.1.0": y, "out.2.z": w}`."""
    out: dict[str, torch.Tensor] = {}
    _walk(obj, prefix, out, 0, set())
    return out


def flatten_call(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """A forward call's inputs: positional args as `in.<i>`, keyword args as `in.<name>`."""
    out = flatten(args, "in")
    for k, v in kwargs.items():
        out.update(flatten(v, f"in.{k}"))
    return out


def _walk(obj: object, name: str, out: dict[str, torch.Tensor], depth: int, seen: set[int]) -> None:
    if isinstance(obj, torch.Tensor):
        out[name] = obj
        return
    if depth >= MAX_DEPTH or id(obj) in seen or not _is_container(obj):
        return
    seen.add(id(obj))
    for key, value in _children(obj):
        _walk(value, f"{name}.{key}", out, depth + 1, seen)


def _is_container(obj: object) -> bool:
    if isinstance(obj, (list, tuple, dict)) or dataclasses.is_dataclass(obj):
        return True
    # state objects (e.g. a hyper-connection state with `x_prev`): public attributes; never modules, types or code
    return hasattr(obj, "__dict__") and not isinstance(
        obj, (nn.Module, type, types.ModuleType, types.FunctionType, types.MethodType)
    )


def _children(obj: object):
    if dataclasses.is_dataclass(obj):
        return ((f.name, getattr(obj, f.name, None)) for f in dataclasses.fields(obj) if not f.name.startswith("_"))
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return zip(obj._fields, obj)
    if isinstance(obj, (list, tuple)):
        return enumerate(obj)
    if isinstance(obj, dict):
        return ((str(k), v) for k, v in obj.items())
    return ((k, v) for k, v in vars(obj).items() if not k.startswith("_"))

"""Per-weight conversions done once, for every backend (an aiter layout, the Triton o_lora's FP8 wo_a): derived from
the tensor the model holds at the first call, and reused while that tensor (identity, storage, version) is
unchanged; an in-place update or a new tensor recomputes it. Nothing is kept alive by the cache (weak references).
Inference tensors carry no version counter: they are converted on every call, never cached (a planted-bug
selftest builds its wrong weights under inference mode)."""

import weakref
from collections.abc import Callable

import torch

# (conversion name, id(weight)) -> (weakref, storage pointer, version, converted)
_CACHE: dict[tuple[str, int], tuple] = {}


def converted(name: str, w: torch.Tensor, convert: Callable[[torch.Tensor], object]):
    """`convert(w)`, computed once per tensor and version under `name`."""
    if w.is_inference():
        return convert(w)
    key = (name, id(w))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w.data_ptr() and hit[2] == w._version:
        return hit[3]
    value = convert(w)
    _CACHE[key] = (weakref.ref(w, lambda _, k=key, c=_CACHE: c.pop(k, None)), w.data_ptr(), w._version, value)
    return value

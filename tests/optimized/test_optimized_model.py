"""The optimized modules: the reference's parameters without the reference's caches (those live in a PagedCache)."""

import collections

import pytest
import torch
from torch import nn

from parity.optimized.model import OptimizedTransformer
from parity.reference import model as ref
from parity.reference.model import Transformer


def test_same_parameters_as_the_reference_and_no_reference_cache(tiny_args):
    with torch.device("meta"):
        opt, ref = OptimizedTransformer(tiny_args), Transformer(tiny_args)
    params = lambda m: [(n, p.shape, p.dtype) for n, p in m.named_parameters()]  # noqa: E731
    assert params(opt) == params(ref)
    assert {name.rsplit(".", 1)[-1] for name, _ in opt.named_buffers()} == {"freqs_cis"}
    opt.reset_buffers()  # what a checkpoint load runs: only the RoPE tables are rebuilt


@pytest.mark.parametrize("model_class", [Transformer, OptimizedTransformer])
def test_every_module_is_built_once_and_kept(tiny_args, monkeypatch, model_class):
    """No constructor builds a sub-module that a subclass then replaces: the reference constructors build the
    optimized sub-modules in place of their own, so every module built is the one the model keeps, built once."""
    calls = collections.Counter()  # reference class -> how often its __init__ ran
    built = {}  # id -> module: every module a reference __init__ ran on (kept alive, so ids stay unique)
    classes = [c for c in vars(ref).values() if isinstance(c, type) and issubclass(c, nn.Module)]
    assert all("__init__" in vars(c) for c in classes)  # each its own, so each wrapped once
    for cls in classes:

        def counting(self, *args, _cls=cls, _init=cls.__init__, **kwargs):
            calls[_cls] += 1
            built[id(self)] = self
            _init(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    with torch.device("meta"):
        model = model_class(tiny_args)
    kept = {id(m): m for m in model.modules()}
    assert [type(m).__name__ for i, m in built.items() if i not in kept] == []  # built, then dropped
    assert {c.__name__: calls[c] for c in classes} == {
        c.__name__: sum(isinstance(m, c) for m in kept.values()) for c in classes
    }  # each kept module's constructors ran once

"""Where the compiled tile loop cannot be imported (numba missing, or no writable place for its cache), compare runs
the torch form: the same metrics within the summation bound, never an error."""

import importlib.abc
import sys

import pytest
import torch

import parity.compare
from parity.compare import compare_tensors, fused


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path, target=None):
        if name == "parity.compare.tile_loop":
            raise self.error
        return None


@pytest.mark.parametrize(
    "error",
    [ImportError("No module named 'numba'"), RuntimeError("cannot cache function '_row': no locator available")],
    ids=["numba-missing", "no-cache-dir"],
)
def test_compare_falls_back_to_the_torch_form(monkeypatch, error):
    x = torch.randn(33, 17, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = (x.float() * 1.01).bfloat16()
    want = compare_tensors(x, y)  # the compiled loop
    monkeypatch.delitem(sys.modules, "parity.compare.tile_loop", raising=False)
    monkeypatch.delattr(parity.compare, "tile_loop", raising=False)  # else `from parity.compare import` finds it
    monkeypatch.setattr(sys, "meta_path", [_Refuse(error), *sys.meta_path])
    fused._tile_loops.cache_clear()
    try:
        assert fused.compiled_loop(x, y) is None
        got = compare_tensors(x, y)
    finally:
        fused._tile_loops.cache_clear()
    # maxima are exact in both forms; sums differ only in order: each cosine is within 2 gamma + 8 u of the exact one
    # (tests/compare/test_metrics_accuracy.py), so the two within twice that
    u = 2.0**-53
    gamma = x.numel() * u / (1 - x.numel() * u)
    assert got.max_abs == want.max_abs and got.max_rel == want.max_rel
    assert abs(got.cos - want.cos) <= 2 * (2 * gamma + 8 * u)
    assert got.worst_token[0] == want.worst_token[0]
    assert abs(got.worst_token[1] - want.worst_token[1]) <= 2 * (2 * gamma + 8 * u)

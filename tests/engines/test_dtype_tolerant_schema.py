"""`parity schema` with a width-tolerant name map (`dtype_width = true`): fp32 vs bf16 and int32 vs int64 are notes,
a change of kind (float vs int) still fails; without the key every dtype difference fails, as before."""

import pytest
import torch
from torch import nn

from parity import dump
from parity.compare import schema_diff
from parity.compare.loader import Dump
from parity.compare.namemap import NameMap
from parity.errors import ParityError


class Toy(nn.Module):
    def __init__(self, float_dtype: torch.dtype, id_dtype: torch.dtype):
        super().__init__()
        self.proj = nn.Linear(4, 4).to(float_dtype)
        self.ids = nn.Identity()
        self.id_dtype = id_dtype

    def forward(self, x):
        y = self.proj(x.to(self.proj.weight.dtype))
        return self.ids(y.float().argmax(-1, keepdim=True).to(self.id_dtype))


def _dump(float_dtype, id_dtype, name) -> Dump:
    writer = dump.MemoryWriter()
    model = Toy(float_dtype, id_dtype)
    with dump.install(model, dump.DumpConfig(modules=r"^(proj|ids)$"), writer=writer), dump.phase("prefill"):
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))
    return Dump.from_memory(writer, name)


def _map(tmp_path, text: str) -> NameMap:
    path = tmp_path / "map.toml"
    path.write_text(text)
    return NameMap.load(path)


def test_width_differences_are_notes_with_the_key(tmp_path):
    a, b = _dump(torch.float32, torch.int32, "a"), _dump(torch.bfloat16, torch.int64, "b")
    strict = [(r.issue, r.a, r.b, r.fails) for r in schema_diff(a, b)]
    assert ("dtype", "float32", "bfloat16", True) in strict and ("dtype", "int32", "int64", True) in strict
    tolerant = schema_diff(a, b, _map(tmp_path, "dtype_width = true\n"))
    assert {(r.a, r.b) for r in tolerant} == {("float32", "bfloat16"), ("int32", "int64")}
    assert not any(r.fails for r in tolerant)


def test_a_change_of_kind_still_fails(tmp_path):
    a, b = _dump(torch.float32, torch.int64, "a"), _dump(torch.float32, torch.float32, "b")
    rows = schema_diff(a, b, _map(tmp_path, "dtype_width = true\n"))
    assert [(r.a, r.b, r.fails) for r in rows] == [("int64", "float32", True)]


def test_dtype_width_must_be_a_bool(tmp_path):
    with pytest.raises(ParityError, match="dtype_width must be true or false, got 'yes'"):
        _map(tmp_path, 'dtype_width = "yes"\n')

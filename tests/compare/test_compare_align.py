"""Alignment: name maps, seq-layout adapters, rank merging, and clear failures instead of silent truncation."""

import pytest
import torch
from torch import nn

from parity import dump
from parity.compare import NameMap, Selection, compare_dumps, load_dump
from parity.dump.config import Ranges
from parity.errors import ParityError

torch.manual_seed(0)


def _write_map(tmp_path, text):
    path = tmp_path / "map.toml"
    path.write_text(text)
    return path


def test_name_map_renames_ignores_and_shards(tmp_path):
    m = NameMap.load(
        _write_map(
            tmp_path,
            r"""
ignore = ['rotary']
[[rename]]
match = '^model\.layers\.(\d+)\.mlp:'
to = 'layers.\1.ffn:'
[[rename]]
side = "a"
match = 'attn_out$'
to = 'out'
[[shard]]
match = 'wo:out$'
dim = -1
[[shard]]
match = 'ffn:out$'
reduce = "sum"
""",
        )
    )
    assert m.rename("model.layers.12.mlp:out", "b") == "layers.12.ffn:out"
    assert m.rename("model.layers.12.mlp:out", "a") == "model.layers.12.mlp:out"
    assert m.rename("layers.0:attn_out", "a") == "layers.0:out"
    assert m.ignored("layers.0.rotary:out") and not m.ignored("layers.0:out")
    assert m.shard("layers.0.attn.wo:out").dim == -1 and m.shard("layers.0.ffn:out").reduce == "sum"
    assert m.shard("layers.0:out") is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        pytest.param("[[rename]\n", "not valid TOML", id="bad-toml"),
        pytest.param(
            "[[rename]]\nmatch = '('\nto = 'x'\n", "rename\\[0\\]: match '\\(' is not a valid regex", id="bad-regex"
        ),
        pytest.param(
            "[[rename]]\npattern = 'x'\nto = 'y'\n", "rename\\[0\\]: unknown key\\(s\\) pattern", id="unknown-key"
        ),
        pytest.param("[[rename]]\nmatch = 'x'\n", "rename\\[0\\]: to must be a string", id="missing-to"),
        pytest.param("[[rename]]\nmatch = 'x'\nto = 'y'\nside = 'c'\n", "side must be", id="bad-side"),
        pytest.param("[[shard]]\nmatch = 'x'\n", "shard\\[0\\]: give dim", id="shard-no-dim"),
        pytest.param("ignore = 'x'\n", "ignore must be a list", id="ignore-not-list"),
        pytest.param("renames = []\n", "unknown key\\(s\\) renames", id="unknown-top-key"),
    ],
)
def test_bad_name_map_is_one_clear_error(tmp_path, text, match):
    with pytest.raises(ParityError, match=match):
        NameMap.load(_write_map(tmp_path, text))


def test_rename_aligns_two_implementations(tmp_path, write_dump):
    x = torch.randn(3, 5)
    a = load_dump(write_dump(tmp_path / "a", {"layers.0.ffn:out": x, "layers.0:out": x + 1}))
    b = load_dump(write_dump(tmp_path / "b", {"model.layers.0.mlp:out": x, "model.layers.0:out": x + 1}))
    assert {r.status for r in compare_dumps(a, b)} == {"fail"}
    m = NameMap.load(
        _write_map(
            tmp_path,
            r"""
[[rename]]
match = '^model\.layers\.(\d+)\.mlp:'
to = 'layers.\1.ffn:'
[[rename]]
match = '^model\.'
to = ''
""",
        )
    )
    results = compare_dumps(a, b, name_map=m)
    assert [(r.name, r.status) for r in results] == [("layers.0.ffn:out", "pass"), ("layers.0:out", "pass")]


def test_missing_records_fail_unless_allowed(tmp_path, write_dump):
    x = torch.randn(2, 2)
    a = load_dump(write_dump(tmp_path / "a", {"layers.0:out": x, "layers.1:out": x}))
    b = load_dump(write_dump(tmp_path / "b", {"layers.0:out": x, "extra:out": x}))
    rows = {r.name: r for r in compare_dumps(a, b)}
    assert rows["layers.1:out"].reasons == ("missing in b",) and rows["extra:out"].reasons == ("missing in a",)
    rows = {r.name: r for r in compare_dumps(a, b, allow_missing="extra")}
    assert rows["extra:out"].status == "skip" and rows["layers.1:out"].status == "fail"


def test_shape_mismatch_fails_with_both_shapes(tmp_path, write_dump):
    a = load_dump(write_dump(tmp_path / "a", {"layers.0:out": torch.zeros(4, 8)}))
    b = load_dump(write_dump(tmp_path / "b", {"layers.0:out": torch.zeros(4, 7)}))
    (r,) = compare_dumps(a, b)
    assert r.status == "fail" and r.reasons == ("shape [4, 8] vs [4, 7] (no seq layout lines them up)",)


class _PositionWise(nn.Module):
    """Token-wise layers: a batched `[b, s, d]` run and a flat ragged `[T, d]` run must agree token by token."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.layers = nn.ModuleList(nn.Linear(10, 10) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("lens", [pytest.param([5, 5, 5], id="equal"), pytest.param([5, 2, 4], id="padded")])
def test_batched_vs_flat_ragged_layouts_line_up(tmp_path, lens):
    model = _PositionWise()
    b, s = len(lens), max(lens)
    batched = torch.randn(b, s, 10)
    flat = torch.cat([batched[i, :n] for i, n in enumerate(lens)])  # [T, 10]
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    for name, x, layout in (("a", batched, {"batch": b}), ("b", flat, {"cu_seqlens": cu})):
        with dump.install(model, dump.DumpConfig(dir=tmp_path / name)), dump.phase("prefill", **layout):
            model(x)
    results = compare_dumps(load_dump(tmp_path / "a"), load_dump(tmp_path / "b"))
    # a GEMM over another row count may round differently, so not bitwise; within fp32 noise
    assert [r.status for r in results] == ["pass", "pass"] and all(r.metrics.cos > 1 - 1e-12 for r in results)
    assert all(r.notes == ("a [b, s, ...] packed to b's cu_seqlens",) for r in results)
    # a real difference in one sequence is still found after packing, at the right token
    with dump.install(model, dump.DumpConfig(dir=tmp_path / "c")), dump.phase("prefill", cu_seqlens=cu):
        bad = flat.clone()
        bad[cu[1]] += 1.0  # first token of sequence 1
        model(bad)
    (first, _) = compare_dumps(load_dump(tmp_path / "a"), load_dump(tmp_path / "c"))
    assert first.status == "fail" and first.metrics.worst_token[0] == (cu[1],)


def _tp_dump(tmp_path, write_dump, name, full, *, sharded_dim=None, partial=False, world=2):
    for rank in range(world):
        if sharded_dim is not None:
            t = full.chunk(world, dim=sharded_dim)[rank]
        elif partial:
            t = full / world
        else:
            t = full
        write_dump(tmp_path / name, {"layers.0.wo:out": t}, rank=rank, world_size=world)
    return load_dump(tmp_path / name)


def test_tensor_parallel_shards_merge_by_the_map(tmp_path, write_dump):
    full = torch.randn(4, 6, dtype=torch.float64)
    ref = load_dump(write_dump(tmp_path / "ref", {"layers.0.wo:out": full}))
    cat = NameMap.load(_write_map(tmp_path, "[[shard]]\nmatch = 'wo:out'\ndim = -1\n"))
    total = NameMap.load(_write_map(tmp_path, "[[shard]]\nmatch = 'wo:out'\nreduce = 'sum'\n"))
    sharded = _tp_dump(tmp_path, write_dump, "cat", full, sharded_dim=-1)
    assert [r.status for r in compare_dumps(ref, sharded, name_map=cat)] == ["pass"]
    (no_rule,) = compare_dumps(ref, sharded)
    assert no_rule.status == "fail" and "replicas differ from rank 0 on rank(s) [1]" in no_rule.reasons[0]
    partial = _tp_dump(tmp_path, write_dump, "sum", full, partial=True)
    assert [r.status for r in compare_dumps(ref, partial, name_map=total)] == ["pass"]
    replicated = _tp_dump(tmp_path, write_dump, "rep", full)
    assert [r.status for r in compare_dumps(ref, replicated)] == ["pass"]
    same_world = compare_dumps(sharded, _tp_dump(tmp_path, write_dump, "cat2", full, sharded_dim=-1))
    assert [(r.record.rank, r.status) for r in same_world] == [(0, "pass"), (1, "pass")]


def test_stats_mode_dumps_compare_on_norms(tmp_path, write_dump):
    x = torch.randn(8, 8)
    full = load_dump(write_dump(tmp_path / "full", {"layers.0:out": x}))
    stats = load_dump(write_dump(tmp_path / "stats", {"layers.0:out": x}, mode="stats"))
    scaled = load_dump(write_dump(tmp_path / "scaled", {"layers.0:out": x * 1.5}, mode="stats"))
    (ok,) = compare_dumps(full, stats)
    assert ok.status == "pass" and ok.metrics.norm_ratio == pytest.approx(1.0) and "stats mode" in ok.notes[-1]
    (bad,) = compare_dumps(stats, scaled)
    assert bad.status == "fail" and "norm ratio" in bad.reasons[0]


def test_selection_and_empty_selection(tmp_path, write_dump):
    x = torch.randn(2, 2)
    a = load_dump(write_dump(tmp_path / "a", {"layers.0:out": x, "layers.1:out": x, "head:out": x}))
    picked = compare_dumps(a, a, select=Selection(layers=Ranges.parse("1", "--layers")))
    assert [r.name for r in picked] == ["layers.1:out"]
    assert [r.name for r in compare_dumps(a, a, select=Selection(name="head"))] == ["head:out"]
    with pytest.raises(ParityError, match="no record to compare"):
        compare_dumps(a, a, select=Selection(phases=frozenset({"decode"})))

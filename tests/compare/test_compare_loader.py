"""load_dump: every kind of bad dump is one ParityError naming the file, line and field."""

import json

import pytest
import torch

from parity.compare import load_dump
from parity.errors import ParityError


@pytest.fixture
def good(tmp_path, write_dump):
    torch.manual_seed(0)
    tensors = {"layers.0:out": torch.randn(4, 8), "layers.1:out": torch.randn(4, 8, dtype=torch.bfloat16)}
    return write_dump(tmp_path / "d", tensors)


def _lines(d):
    return (d / "manifest.jsonl").read_text().splitlines()


def _write_lines(d, lines, end="\n"):
    (d / "manifest.jsonl").write_text("\n".join(lines) + end)


def _edit_line(d, n, **changes):
    lines = _lines(d)
    obj = json.loads(lines[n])
    obj.update(changes)
    lines[n] = json.dumps(obj)
    _write_lines(d, lines)


def test_good_dump_loads_lazily(good):
    d = load_dump(good)
    assert [r.name for r in d.records] == ["layers.0:out", "layers.1:out"]
    assert d.load(d.records[1]).dtype == torch.bfloat16 and d.world_size == 1


def _truncate_file(d):
    path = d / json.loads(_lines(d)[1])["file"]
    path.write_bytes(path.read_bytes()[:-7])


def _delete_file(d):
    (d / json.loads(_lines(d)[0])["file"]).unlink()


def _cut_last_line(d):
    text = (d / "manifest.jsonl").read_text()
    (d / "manifest.jsonl").write_text(text[:-25])


def _garbage_file(d):
    (d / json.loads(_lines(d)[0])["file"]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")


def test_records_come_back_in_execution_order(good):
    """Two writer threads (a model and its drafter) can append their batches out of order: `seq` decides."""
    lines = _lines(good)
    assert [json.loads(line)["seq"] for line in lines] == sorted(json.loads(line)["seq"] for line in lines)
    _write_lines(good, lines[::-1])
    assert [r.name for r in load_dump(good).records] == ["layers.0:out", "layers.1:out"]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        pytest.param(
            lambda d: _edit_line(d, 1, shape=[4, 9]),
            r"line 2\): tensor 'out' has shape \[4, 8\] in the "
            r"file but \[4, 9\] in the manifest",
            id="manifest-shape-differs",
        ),
        pytest.param(lambda d: _edit_line(d, 0, shape=[4, -8]), "line 1: field 'shape'", id="negative-shape"),
        pytest.param(lambda d: _edit_line(d, 0, shape="4x8"), "line 1: field 'shape' must be a list", id="shape-str"),
        pytest.param(
            lambda d: _edit_line(d, 0, dtype="float99"), "line 1: field 'dtype' is not a torch dtype", id="bad-dtype"
        ),
        pytest.param(lambda d: _edit_line(d, 0, layer=True), "line 1: field 'layer' must be an int", id="bool-layer"),
        pytest.param(
            lambda d: _edit_line(d, 1, phase="warmup"), "line 2: field 'phase' must be one of", id="bad-phase"
        ),
        pytest.param(
            lambda d: _edit_line(d, 1, schema_version=9), "line 2: schema_version 9 unsupported", id="future-schema"
        ),
        pytest.param(lambda d: _edit_line(d, 1, name=None), "line 2: missing field 'name'", id="missing-field"),
        pytest.param(lambda d: _edit_line(d, 0, cu_seqlens=[0, 4, 2]), "line 1: field 'cu_seqlens'", id="bad-cu"),
        pytest.param(lambda d: _edit_line(d, 0, stats={"l2": 1}), "exactly one of 'file'", id="file-and-stats"),
        pytest.param(lambda d: _edit_line(d, 1, key="nope"), "has no tensor 'nope'", id="missing-key"),
        pytest.param(lambda d: _edit_line(d, 1, rank=3), "line 2: rank 3 is outside world_size 1", id="bad-rank"),
        pytest.param(lambda d: _edit_line(d, 1, name="layers.0:out"), "already at .* line 1", id="duplicate"),
        pytest.param(_cut_last_line, "line 2: cut off mid-line", id="truncated-manifest-line"),
        pytest.param(
            lambda d: _write_lines(d, [_lines(d)[0], "{oops", _lines(d)[1]]),
            "line 2: not valid JSON",
            id="garbage-line",
        ),
        pytest.param(
            lambda d: _write_lines(d, [_lines(d)[0], "", _lines(d)[1]]), "line 2: not valid JSON", id="blank-line"
        ),
        pytest.param(lambda d: _write_lines(d, [], end=""), "holds no records", id="empty-manifest"),
        pytest.param(lambda d: _write_lines(d, ["[1, 2]"]), "line 1: expected a JSON object", id="not-object"),
        pytest.param(lambda d: (d / "manifest.jsonl").write_bytes(b"\xff\xfe"), "cannot read", id="not-utf8"),
        pytest.param(_truncate_file, "not a readable safetensors file", id="truncated-safetensors"),
        pytest.param(_garbage_file, "not a readable safetensors file", id="garbage-safetensors"),
        pytest.param(_delete_file, r"\.safetensors \(.*line 1\): missing", id="missing-file"),
        pytest.param(lambda d: (d / "manifest.jsonl").unlink(), "no manifest.jsonl here", id="no-manifest"),
    ],
)
def test_bad_dump_is_one_clear_error(good, corrupt, match):
    corrupt(good)
    with pytest.raises(ParityError, match=match) as e:
        load_dump(good)
    assert "\n" not in str(e.value)


def test_not_a_dir(tmp_path):
    with pytest.raises(ParityError, match="no such dump dir"):
        load_dump(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ParityError, match="not a directory"):
        load_dump(tmp_path / "f")


def test_dtype_differs_from_manifest_on_load(good):
    _edit_line(good, 0, dtype="float16")
    # headers carry dtypes too: the disagreement is refused before any number is read
    with pytest.raises(ParityError, match="has dtype float32 in the file but float16 in the manifest"):
        load_dump(good)


def test_rank_dirs_load_as_one_dump(tmp_path, write_dump):
    for rank in range(2):
        write_dump(tmp_path / "tp", {"layers.0:out": torch.full((2, 3), float(rank))}, rank=rank, world_size=2)
    d = load_dump(tmp_path / "tp")
    assert d.world_size == 2 and [r.rank for r in d.records] == [0, 1]
    assert d.load(d.records[1]).eq(1).all() and d.records[1].file.startswith("rank1/")

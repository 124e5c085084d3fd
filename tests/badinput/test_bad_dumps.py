"""Bad dumps: a missing rank, a header/manifest dtype disagreement, ill-typed stats records, a dtype change between
A and B. None may crash, none may pass."""

import json
import shutil

import pytest
import torch

from tests.badinput.conftest import as_world, assert_bad_input, copy_dump, edit_line, manifest, tree, write_manifest


def test_a_deleted_rank_dir_is_refused_not_compared(parity_cli, ref, tmp_path):
    tp = as_world(ref, tmp_path / "tp", world=2)
    shutil.rmtree(tp / "rank1")
    before = tree(tp)
    for args in (("compare", ref, tp), ("compare", tp, tp), ("bisect", ref, tp), ("dump-info", tp)):
        assert_bad_input(parity_cli(*args), str(tp), "world_size 2", "rank1/manifest.jsonl")
    assert tree(tp) == before


def test_the_complete_world_2_dump_is_accepted(parity_cli, ref, tmp_path):
    """The control of the test above: the same dump with both ranks compares clean against world size 1."""
    tp = as_world(ref, tmp_path / "tp", world=2)
    r = parity_cli("compare", ref, tp)
    assert r.code == 0, r.out


def test_a_record_missing_on_one_rank_fails_when_ranks_merge(parity_cli, ref, tmp_path):
    tp = as_world(ref, tmp_path / "tp", world=2)
    lines = manifest(tp / "rank1")
    gone = lines.pop(1)
    write_manifest(tp / "rank1", lines)
    r = parity_cli("compare", ref, tp, "--name", f"^{gone['name']}$", "--phase", gone["phase"], "--json")
    assert r.code == 1 and "Traceback" not in r.out + r.err
    reasons = {row["reasons"] for row in json.loads(r.out)["rows"] if row["status"] == "fail"}
    assert any("1 of 2 rank shards (rank(s) [1] missing)" in x for x in reasons), reasons


def test_manifest_and_header_dtype_disagree(parity_cli, ref, tmp_path):
    bad = copy_dump(ref, tmp_path / "bad")
    line = edit_line(bad, 2, dtype="float16")
    assert_bad_input(parity_cli("dump-info", bad), line["file"], "manifest.jsonl line 3", "float32", "float16")


@pytest.mark.parametrize(
    ("stats", "field"),
    [
        pytest.param({"numel": 10, "inf": 0, "l2": 1.0}, "stats.nan", id="missing-nan"),
        pytest.param({"numel": 10, "nan": "0", "inf": 0, "l2": 1.0}, "stats.nan", id="nan-as-string"),
        pytest.param({"numel": -1, "nan": 0, "inf": 0, "l2": 1.0}, "stats.numel", id="negative-numel"),
        pytest.param({"numel": 10, "nan": 0, "inf": 0}, "stats.l2", id="missing-l2"),
        pytest.param({"numel": 10, "nan": 0, "inf": 0, "l2": None}, "stats.l2", id="null-l2"),
    ],
)
def test_ill_typed_stats_records(parity_cli, ref, tmp_path, stats, field):
    bad = copy_dump(ref, tmp_path / "bad")
    edit_line(bad, 0, file=None, key=None, stats=stats)
    assert_bad_input(parity_cli("compare", ref, bad), "manifest.jsonl line 1", field)


def test_a_dtype_change_between_a_and_b_fails_in_the_table(parity_cli, toy_dumps):
    from tests.dump.toymodel import ToyLM

    bf16 = toy_dumps.custom("bf16", ToyLM().to(torch.bfloat16))
    table = parity_cli("compare", toy_dumps.ref, bf16)
    assert table.code == 1 and "FAILED | 0 pass" in table.out and "dtype float32 vs" in table.out
    r = parity_cli("compare", toy_dumps.ref, bf16, "--json")
    rows = json.loads(r.out)["rows"]
    assert r.code == 1 and all(
        row["status"] == "fail" and "dtype float32 vs bfloat16" in row["reasons"] for row in rows
    )
    # asked for, it is measured instead (and the bf16 rounding passes)
    assert parity_cli("compare", toy_dumps.ref, bf16, "--allow-dtype-change").code == 0


def test_a_full_mode_record_without_its_key(parity_cli, ref, tmp_path):
    bad = copy_dump(ref, tmp_path / "bad")
    edit_line(bad, 1, key=None)
    assert_bad_input(parity_cli("dump-info", bad), "manifest.jsonl line 2", "missing field 'key'")


def test_a_tensor_file_replaced_by_a_dir(parity_cli, ref, tmp_path):
    bad = copy_dump(ref, tmp_path / "bad")
    target = bad / manifest(bad)[0]["file"]
    target.unlink()
    target.mkdir()
    assert_bad_input(parity_cli("dump-info", bad), str(target), "is a directory")


def test_a_dump_dir_that_is_a_file(parity_cli, ref, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_bad_input(parity_cli("compare", ref, f), str(f), "not a directory")


@pytest.mark.parametrize("field", ["step", "call", "call_in_step", "seq", "layer"])
def test_a_negative_counter_in_a_manifest_line(parity_cli, ref, tmp_path, field):
    bad = copy_dump(ref, tmp_path / "bad")
    edit_line(bad, 1, **{field: -1})
    assert_bad_input(parity_cli("compare", ref, bad), "manifest.jsonl line 2", f"field '{field}' must be >= 0")


def test_a_flat_dump_and_rank_dirs_in_one_dir(parity_cli, ref, tmp_path):
    """Two dumps in one dir: the rank dirs were ignored and the flat one compared as PASSED."""
    both = copy_dump(ref, tmp_path / "both")
    as_world(ref, tmp_path / "tp", world=2)
    shutil.copytree(tmp_path / "tp" / "rank0", both / "rank0")
    before = tree(both)
    for args in (("compare", ref, both), ("dump-info", both)):
        assert_bad_input(parity_cli(*args), str(both), "both manifest.jsonl and rank dirs (rank0)")
    assert tree(both) == before


def test_rank_dirs_of_two_world_sizes_in_one_dump(parity_cli, ref, tmp_path):
    mixed = as_world(ref, tmp_path / "mixed", world=2)
    as_world(ref, tmp_path / "w4", world=4)
    shutil.copytree(tmp_path / "w4" / "rank2", mixed / "rank2")
    assert_bad_input(parity_cli("compare", ref, mixed), str(mixed), "world_size")


def test_dumps_of_two_world_sizes_compare_by_their_merge_rules(parity_cli, ref, tmp_path):
    """The control of the two above: world size 2 against world size 4, each complete, merge and pass."""
    r = parity_cli("compare", as_world(ref, tmp_path / "w2", world=2), as_world(ref, tmp_path / "w4", world=4))
    assert r.code == 0, r.out


@pytest.mark.parametrize("command", ["compare", "bisect", "dump-info", "slot-invariance"])
def test_a_record_file_cut_short(parity_cli, ref, tmp_path, command):
    bad = copy_dump(ref, tmp_path / "bad")
    f = bad / manifest(bad)[0]["file"]
    f.write_bytes(f.read_bytes()[:-7])
    args = (bad,) if command in ("dump-info", "slot-invariance") else (ref, bad)
    assert_bad_input(parity_cli(command, *args), str(f), "not a readable safetensors file")


@pytest.mark.parametrize(
    ("fields", "culprit"),
    [
        pytest.param({"requests": ["a"]}, "field 'requests' has 1 entries for 2 sequences", id="requests-short"),
        pytest.param({"start_pos": [0, 0, 0]}, "field 'start_pos' has 3 entries for 2", id="start-pos-long"),
        pytest.param({"start_pos": [-3, 0]}, "field 'start_pos' must be >= 0", id="start-pos-negative"),
        pytest.param({"world_size": 0}, "field 'world_size' must be >= 1", id="world-0"),
        pytest.param({"file": "../../elsewhere.safetensors"}, "field 'file' must be a path inside", id="file-escape"),
        pytest.param({"file": "/etc/passwd"}, "field 'file' must be a path inside", id="file-absolute"),
    ],
)
def test_tags_that_disagree_or_point_outside(parity_cli, ref, tmp_path, fields, culprit):
    """Passed before as long as the tensors matched: the tags address the rows judge and slot-invariance compare."""
    bad = copy_dump(ref, tmp_path / "bad")
    assert manifest(bad)[0]["batch"] == 2  # two sequences, two request ids
    edit_line(bad, 0, **fields)
    assert_bad_input(parity_cli("compare", ref, bad), "manifest.jsonl line 1", culprit)

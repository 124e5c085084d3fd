"""Bad saved runs for `parity judge DIR` (a `parity run --dump` dir): run.json missing, cut or disagreeing with the
records (layers, requests, first chunks), a reference record or field missing (whose rows would otherwise be judged
against the candidate's own values and pass), damaged tensor files and manifest lines. Each is one line naming the
file and field, exit 2, the dir unchanged; the intact copy judges PASSED."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from tests.badinput.conftest import (
    assert_refused_unchanged,
    edit_line,
    manifest,
    write_manifest,
)


@pytest.fixture
def run_dir(small_run, tmp_path):
    return shutil.copytree(small_run.dump, tmp_path / "run")


def _run_json(d, **changes) -> None:
    meta = json.loads((d / "run.json").read_text())
    meta.update(changes)
    (d / "run.json").write_text(json.dumps(meta))


def _refused(parity_cli, d, *culprits) -> str:
    return assert_refused_unchanged(d, lambda: parity_cli("judge", d), *culprits)


def test_the_copy_judges_clean(parity_cli, run_dir):
    r = parity_cli("judge", run_dir)
    assert r.code == 0 and "PASSED" in r.out, r.err


@pytest.mark.parametrize(
    ("changes", "culprits"),
    [
        pytest.param({"n_layers": 40}, ("'n_layers' is 40", "holds layers 0..3"), id="n-layers-more"),
        pytest.param({"n_layers": 1}, ("'n_layers' is 1", "holds layers 0..3"), id="n-layers-fewer"),
        pytest.param({"n_layers": "4"}, ("'n_layers' must be a positive int",), id="n-layers-str"),
        pytest.param({"layout": {}}, ("'layout' lists requests []", "holds ['0']"), id="layout-empty"),
        pytest.param({"layout": {"7": [5, 5]}}, ("lists requests ['7']", "not in layout: ['0']"), id="layout-other"),
        pytest.param({"layout": {"0": [-5, 5]}}, ("request '0'", "1 <= first_chunk <= prompt_len"), id="negative"),
        pytest.param({"layout": {"0": [5, 50]}}, ("request '0'", "[5, 50]"), id="chunk-past-prompt"),
        pytest.param({"layout": {"0": [3, 3]}}, ("first_chunk 3", "is 5 tokens"), id="wrong-first-chunk"),
        pytest.param({"exact": "yes"}, ("'exact' must be true or false", "'yes'"), id="exact-str"),
        pytest.param({"schema": 2}, ("schema 1",), id="schema"),
    ],
)
def test_run_json_that_disagrees_with_its_records(parity_cli, run_dir, changes, culprits):
    _run_json(run_dir, **changes)
    _refused(parity_cli, run_dir, str(run_dir / "run.json"), *culprits)


def test_a_cut_run_json(parity_cli, run_dir):
    (run_dir / "run.json").write_text('{"schema": 1, "n_la')
    _refused(parity_cli, run_dir, str(run_dir / "run.json"), "not readable JSON")


def test_a_reference_field_missing_is_not_judged_against_the_candidate(parity_cli, run_dir):
    """One field (out.2 of a three-field tap) dropped from the reference: its rows had been compared with the
    candidate's own values and passed; the saved reference is now refused as incomplete."""
    lines = manifest(run_dir / "reference")
    gone = next(i for i, x in enumerate(lines) if x["field"] == "out.2")
    name = lines.pop(gone)["name"]
    write_manifest(run_dir / "reference", lines)
    _refused(parity_cli, run_dir, str(run_dir / "reference"), f"no record {name}", "incomplete")


@pytest.mark.parametrize(
    ("fields", "culprits"),
    [
        pytest.param({"step": -1}, ("field 'step' must be >= 0",), id="step-negative"),
        pytest.param({"call": -2}, ("field 'call' must be >= 0",), id="call-negative"),
        pytest.param({"start_pos": None}, ("layers.0.streams_in:out", "start_pos"), id="no-start-pos"),
        pytest.param({"shape": "5,4,256"}, ("field 'shape'",), id="shape-str"),
    ],
)
def test_a_damaged_manifest_line(parity_cli, run_dir, fields, culprits):
    edit_line(run_dir / "reference", 0, **fields)
    _refused(parity_cli, run_dir, f"{run_dir / 'reference' / 'manifest.jsonl'} line 1", *culprits)


def test_a_candidate_line_whose_tags_miss_a_row(parity_cli, run_dir):
    edit_line(run_dir / "chained", 0, cu_seqlens=[0, 4])
    where = f"{run_dir / 'chained' / 'manifest.jsonl'} line 1"
    _refused(parity_cli, run_dir, where, "layers.0.streams_in:out", "5 rows but the tags describe 4 tokens")


def test_a_cut_tensor_file(parity_cli, run_dir):
    first = manifest(run_dir / "chained")[0]
    f = run_dir / "chained" / first["file"]
    f.write_bytes(f.read_bytes()[:-9])
    _refused(parity_cli, run_dir, str(f), "not a readable safetensors file")


def test_a_tensor_of_another_dtype(parity_cli, run_dir):
    first = manifest(run_dir / "reference")[0]
    f = run_dir / "reference" / first["file"]
    save_file({k: v.float() for k, v in load_file(f).items()}, f)
    _refused(parity_cli, run_dir, str(f), "dtype float32 in the file but bfloat16 in the manifest")

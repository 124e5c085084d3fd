"""Kernel repro of a planted op bug (the selftest's `wo_a-per-tensor-scale`: wo_a's FP8 block scales collapsed to
one per-tensor scale inside the o_lora op): the verdict names layer 0's `attn.o_lora`; the extraction must pick the
o_lora call of that block and step, and its saved script must fail with the bug and pass with the real backend.

One failing `parity run` of the tiny case per module, its repros extracted as `parity run` and `parity repro
--extract` do it: from the run's own captures (capturing the runs again is refused here), shared by the tests
below."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from parity.cases import load_case
from parity.errors import ParityError
from parity.repro import extract, find_repros, run_and_extract, write_kernel_repros
from parity.repro.extract import first_failure
from tests.repro.scripts import run_script

BUG = "wo_a-per-tensor-scale"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_ckpt):
    folder = tmp_path_factory.mktemp("planted")

    def recapture(*args):
        raise AssertionError("the repros must be recorded from the run's own captures, not from new runs")

    # the other module (test_repro_replaced.py) lets the extraction capture the runs again
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extract, "_recaptured", recapture)
        report, paths = run_and_extract("tiny", folder, checkpoint=tiny_ckpt, plant=BUG)
    return report, folder, paths


def test_the_run_fails_where_the_bug_is(planted):
    report, _, _ = planted
    assert not report.passed and report.planted == BUG
    assert "layers.0.attn.o_lora" in report.location


def test_extraction_saves_the_o_lora_call_of_the_failing_site(planted):
    report, folder, paths = planted
    assert paths == [folder / "repro" / "repro_o_lora.py"]
    meta = json.loads((folder / "repro" / "repro_o_lora.json").read_text())
    assert meta["op"] == "o_lora" and meta["reproduces"] is True
    assert meta["ran"] == {"backend": "torch", "plant": BUG, "impl": None, "replaced": None}
    target, row = first_failure(report, 4)
    site = meta["call_site"]
    assert (site["site"], site["step"], site["request"], site["position"]) == (
        target.site, target.step, target.request, target.position,
    )  # fmt: skip
    assert site["in_site_segment"] and meta["verdict"]["site"] == row["site"] == "layers.0.attn.o_lora"
    # the torch backend claims bitwise equality with its twin: any difference fails
    assert meta["threshold"] == 0.0 and "bitwise" in meta["threshold_source"]
    tensors = load_file(folder / "repro" / meta["tensors"])
    # o [T, h*d] bf16 and wo_a [g*rank, h*d/g]: the tiny model's layer 0 shapes, as recorded
    assert meta["dtypes"]["args.0"] == "bfloat16" and tensors["args.0"].shape[1] == 512
    assert list(tensors["args.1"].shape) == [256, 256] == meta["shapes"]["args.1"]
    assert meta["args"]["tuple"][2] == {"value": 2} and meta["args"]["tuple"][3] == {"value": 128}
    failing = [o for o in meta["result"]["outputs"] if not o["passed"]]
    assert failing and failing[0]["max_row_err"] > 0.01


def test_saved_script_fails_with_the_bug_and_passes_with_the_fixed_backend(planted):
    _, folder, _ = planted
    path = folder / "repro" / "repro_o_lora.py"
    buggy = run_script(path)
    assert buggy.returncode == 1, buggy.stdout + buggy.stderr
    assert buggy.stdout.rstrip().endswith("FAIL") and f"planted bug {BUG!r}" in buggy.stdout
    assert "candidate output identical to the run's: True" in buggy.stdout  # the replay is the run's call
    fixed = run_script(path, "--backend", "torch")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert fixed.stdout.rstrip().endswith("PASS") and "bitwise True" in fixed.stdout


def test_parity_repro_lists_and_runs_them(planted, parity_cli):
    _, folder, _ = planted
    code, out, _ = parity_cli("repro", folder, "--list")
    assert code == 0 and "repro_o_lora: op o_lora" in out and "reproduced the failure" in out
    code, out, err = parity_cli("repro", folder)
    assert code == 1 and "FAILED | 0/1 repros pass" in out, out + err
    code, out, err = parity_cli("repro", folder, "--run", "o_lora", "--backend", "torch")
    assert code == 0 and "PASSED | 1/1" in out, out + err
    code, _, err = parity_cli("repro", folder, "--run", "rope")
    assert code == 2 and err.count("\n") == 1 and "repro_o_lora" in err


def test_a_passing_report_has_no_first_failure(planted):
    report, _, _ = planted
    report_rows = [r for r in report.sites if r["passed"]]  # the same run's passing rows: nothing to extract
    assert report_rows and first_failure(type(report)(**{**report.to_dict(), "sites": report_rows}), 4) is None


def test_find_repros_refuses_a_repro_without_its_script(planted, tmp_path):
    _, folder, _ = planted
    (tmp_path / "repro_x.json").write_text((folder / "repro" / "repro_o_lora.json").read_text())
    with pytest.raises(ParityError, match="repro_x.py is missing"):
        find_repros(tmp_path)


def test_a_rerun_into_the_same_folder_replaces_the_earlier_repros(planted, tmp_path, parity_cli):
    report, folder, _ = planted
    shutil.copytree(folder / "repro", tmp_path / "repro")
    passed = type(report)(**{**report.to_dict(), "passed": True, "location": ""})  # a clean rerun's report
    assert write_kernel_repros(passed, tmp_path, case=load_case("tiny")) == []
    assert sorted(p.name for p in (tmp_path / "repro").iterdir()) == []  # nothing stale for `parity repro` to run
    code, _, err = parity_cli("repro", folder, "--plant", BUG)
    assert code == 2 and "--plant: only with --extract CASE" in err

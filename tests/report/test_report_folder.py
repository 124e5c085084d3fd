"""The report folder of `parity run`: every file, the planted bug recorded, the CSV and the heatmap data agreeing
with the verdict, `parity report` re-rendering identically, bad summaries refused, `repro.sh` reproducing."""

import csv
import json
import os
import re
import shutil
import stat
import subprocess

import pytest

from parity.errors import ParityError
from parity.report.folder import render_folder
from parity.report.repro_script import script
from parity.report.tables import first_divergence
from tests.report.conftest import BUG, parity

FILES = ("report.md", "report.html", "metrics.csv", "summary.json", "repro.sh")


def _summary(run) -> dict:
    return json.loads((run.folder / "summary.json").read_text())


def test_failing_run_writes_the_folder_and_records_the_planted_bug(failing):
    assert failing.code == 1, failing.err
    assert f"planted bug: {BUG}" in failing.out
    for name in FILES:
        assert (failing.folder / name).is_file(), name
    assert os.stat(failing.folder / "repro.sh").st_mode & stat.S_IXUSR
    s = _summary(failing)
    rep = s["report"]
    assert s["schema"] == "parity.report/1" and s["invocation"]["plant"] == BUG and s["invocation"]["case"] == "tiny"
    assert rep["planted"] == BUG and not rep["passed"]
    assert rep["location"].startswith("layer 0 gate (layers.0.ffn.route:out.0), phase prefill")
    # the first divergence the pages show is the verdict's location, field for field
    first = first_divergence(rep["sites"])
    step, req, pos = first["first_failure"]
    assert rep["location"].startswith(
        f"layer {first['layer']} {first['submodule']} ({first['site']}:{first['field']}), phase {first['phase']}, "
        f"step {step}, request {req}, position {pos}:"
    )
    assert json.loads((failing.folder / "parity.json").read_text()) == rep


def test_passing_run_writes_the_folder(passing):
    assert passing.code == 0, passing.err
    rep = _summary(passing)["report"]
    assert rep["passed"] and rep["planted"] is None and rep["location"] == ""
    assert first_divergence(rep["sites"]) is None
    assert "none: every site of every layer is within its threshold" in (passing.folder / "report.md").read_text()


def test_metrics_csv_has_one_row_per_run_site_field_phase(failing):
    rep = _summary(failing)["report"]
    with open(failing.folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(rep["sites"]) + len(rep["chained"])
    forced = [r for r in rows if r["run"] == "forced"]
    for row, site in zip(forced, rep["sites"]):
        assert (row["site"], row["field"], row["phase"]) == (site["site"], site["field"], site["phase"])
        assert float(row["max_err"]) == site["max_err"] and (row["passed"] == "True") == site["passed"]
    failing_rows = {(r["site"], r["field"], r["phase"]) for r in forced if r["passed"] == "False"}
    assert ("layers.0.ffn.route", "out.0", "prefill") in failing_rows


def test_heatmap_rows_are_the_failing_sites_rows(failing):
    rep = _summary(failing)["report"]
    rm = rep["rowmap"]
    assert (rm["site"], rm["field"], rm["run"]) == ("layers.0.ffn.route", "out.0", "forced")
    judged = [s for s in rep["sites"] if (s["site"], s["field"]) == (rm["site"], rm["field"])]
    # every (request, position) the engine fed: the prompt and every emitted token but the last; the worst row
    # is the verdict's worst
    fed = {str(r["index"]): r["prompt_len"] + r["tokens"] - 1 for r in rep["requests"]}
    assert {r: v["positions"] for r, v in rm["requests"].items()} == {r: list(range(n)) for r, n in fed.items()}
    worst = max(e for v in rm["requests"].values() for e in v["errors"])
    assert worst == pytest.approx(max(s["max_err"] for s in judged), rel=1e-9)
    assert worst > 0


def test_report_command_rerenders_the_same_pages(failing, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(failing.folder, copy, ignore=shutil.ignore_patterns("checkpoint"))
    before = {n: (copy / n).read_bytes() for n in ("report.md", "report.html", "metrics.csv")}
    for n in before:
        (copy / n).unlink()
    p = parity("report", copy)
    assert p.returncode == 0, p.stderr
    assert {n: (copy / n).read_bytes() for n in before} == before


def test_report_command_lists_kernel_repros(failing, tmp_path):
    """The failed run wrote its kernel repros (parity run calls write_kernel_repros) and its pages list them; a
    file added later under repro/ is listed once the folder is rendered again."""
    written = sorted(p.name for p in (failing.folder / "repro").iterdir())
    assert any(name.endswith(".py") for name in written)
    assert all(f"repro/{name}" in (failing.folder / "report.html").read_text() for name in written)
    copy = tmp_path / "copy"
    shutil.copytree(failing.folder, copy, ignore=shutil.ignore_patterns("checkpoint"))
    (copy / "repro" / "moe_gate.py").write_text("# a kernel repro\n")
    render_folder(copy)
    assert "repro/moe_gate.py" in (copy / "report.html").read_text()
    assert "`repro/moe_gate.py`" in (copy / "report.md").read_text()
    assert "repro/moe_gate.py" not in (failing.folder / "report.html").read_text()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda s: s.update(schema="parity.report/0"), "schema: expected 'parity.report/1'", id="schema"),
        pytest.param(lambda s: s["report"].pop("sites"), "report.sites: expected list, found nothing", id="no-sites"),
        pytest.param(lambda s: s["report"].update(passed="yes"), "report.passed: expected bool, found str", id="str"),
        pytest.param(lambda s: s["report"]["sites"][3].pop("max_err"), "report.sites[3]", id="site-key"),
        pytest.param(lambda s: s.pop("invocation"), "invocation: expected an object", id="no-invocation"),
    ],
)
def test_a_bad_summary_is_refused_naming_the_field(failing, tmp_path, edit, message):
    folder = tmp_path / "bad"
    folder.mkdir()
    s = _summary(failing)
    edit(s)
    (folder / "summary.json").write_text(json.dumps(s))
    with pytest.raises(ParityError, match=re.escape(message)):
        render_folder(folder)
    assert not (folder / "report.html").exists()


def test_report_command_refuses_bad_input_in_one_line(failing, tmp_path):
    p = parity("report", tmp_path)
    assert p.returncode == 2 and "summary.json: no such file" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    (tmp_path / "summary.json").write_text(json.dumps({**_summary(failing), "schema": "parity.report/9"}))
    p = parity("report", tmp_path)
    assert p.returncode == 2 and "schema: expected 'parity.report/1', found 'parity.report/9'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_unknown_plant_is_one_line_listing_the_bugs(tmp_path):
    p = parity("run", "--plant", "no-such-bug", "--out", tmp_path / "out")
    assert p.returncode == 2 and "--plant: unknown bug 'no-such-bug'; valid: ue8m0-round-nearest" in p.stderr
    assert BUG in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work


def test_repro_script_carries_case_backends_and_flags(tmp_path):
    inv = {"case": "/abs/my case.toml", "device": "cuda:1", "checkpoint": "/ckpt", "calibration": "/n.json",
           "golden": "always", "bisect": True, "stream": True, "plant": None, "threads": 2,
           "env": {"PARITY_BACKEND": "triton"}, "cwd": "/work", "python": "/venv/bin/python"}  # fmt: skip
    text = script(inv)
    assert "export PARITY_BACKEND=triton\n" in text and "unset PARITY_OPS\n" in text and "cd /work\n" in text
    assert (
        "-m parity run '/abs/my case.toml' --device cuda:1 --golden always --checkpoint /ckpt --calibration /n.json "
        '--threads 2 --bisect --stream "$@"'
    ) in text
    # the script runs what it says: bash parses it, and a stand-in interpreter receives exactly those arguments
    path = tmp_path / "repro.sh"
    path.write_text(script({**inv, "cwd": str(tmp_path)}))
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$PARITY_BACKEND|${PARITY_OPS-unset}|$*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PARITY_PYTHON": str(fake), "PARITY_OPS": "rope=triton"}
    p = subprocess.run(["bash", str(path), "--out", "x"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("triton|unset|-m parity run /abs/my case.toml --device cuda:1") and "--out x" in p.stdout


@pytest.mark.slow
def test_repro_sh_reproduces_the_failure(failing, tmp_path):
    p = subprocess.run([str(failing.folder / "repro.sh"), "--out", str(tmp_path / "again")], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert p.returncode == 1, p.stderr
    again = json.loads((tmp_path / "again" / "summary.json").read_text())["report"]
    assert again["location"] == _summary(failing)["report"]["location"] and again["planted"] == BUG


def test_a_calibrated_run_renders_ratios_and_provenance(failing, tmp_path):
    # the same rows judged by a calibration: positive thresholds, so the curves plot error / threshold
    s = _summary(failing)
    rep = s["report"]
    for r in rep["sites"] + rep["chained"]:
        r["threshold"], r["threshold_source"] = 0.01, "calibrated (cases/x.noise.json): 0.0025 x 4"
    rep["noise"], rep["noise_provenance"] = "cases/x.noise.json", {"machine": "AMD EPYC", "rows": 225386}
    folder = tmp_path / "calibrated"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(s))
    page = render_folder(folder).read_text()
    assert "divided by its threshold; above the dashed line fails" in page
    assert "<td>rows</td><td>225386</td>" in page and "calibrated (cases/x.noise.json): 0.0025 x 4" in page
    md = (folder / "report.md").read_text()
    assert "- provenance rows: 225386" in md and "judged by: calibrated (cases/x.noise.json)" in md
    rows = csv.DictReader((folder / "metrics.csv").read_text().splitlines())
    worst = max(float(r["ratio"]) for r in rows if r["run"] == "forced")
    assert worst == pytest.approx(max(r["max_err"] for r in rep["sites"]) / 0.01)


def test_a_calibration_of_another_mix_is_named_in_both_pages(failing, tmp_path):
    s = _summary(failing)
    rep = s["report"]
    rep["noise"] = "cases/batched.triton-h200.noise.json"
    rep["noise_provenance"] = {"device": "cuda", "backends": {op: "triton" for op in rep["backends"]}}
    folder = tmp_path / "other-mix"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(s))
    page = render_folder(folder).read_text()
    assert "id='noise-mismatch'" in page and f"{len(rep['backends'])} ops on torch (calibrated: triton)" in page
    md = (folder / "report.md").read_text()
    assert "**Not measured for this run**: the noise model was calibrated for another mix" in md
    assert "device cpu (calibrated: cuda)" in md
    # the run's own pages (no calibration) carry no such line
    assert "noise-mismatch" not in (failing.folder / "report.html").read_text()
    assert "Not measured for this run" not in (failing.folder / "report.md").read_text()

"""`parity gate` gives each case its report folder; `.ci/run` installs the browser the HTML check needs."""

import json
import re
import types
from pathlib import Path

import parity.gate as gate_module
from parity.gate import load_suite, run_gate

ROOT = Path(__file__).resolve().parents[2]


def test_gate_writes_a_report_folder_per_case(passing, tmp_path, monkeypatch):
    # the case's run itself is `parity run`'s (tested there): here the passing run's report stands in for it
    rep = json.loads((passing.folder / "summary.json").read_text())["report"]
    heard = []

    def fake_run_case(case, ckpt, progress=None):
        heard.append(progress)
        fields = {k: rep[k] for k in ("case", "passed", "location", "noise", "sites", "wall_s")}
        return types.SimpleNamespace(to_dict=lambda: rep, **fields)

    monkeypatch.setattr(gate_module, "run_case", fake_run_case)
    monkeypatch.setattr(gate_module, "prepare_checkpoint", lambda case, ckpt, out, progress=None: out / "checkpoint")
    suite = tmp_path / "suite.toml"
    suite.write_text('name = "s"\ncases = ["tiny"]\n')
    steps = []
    result = run_gate(load_suite(suite), tmp_path / "out", steps=lambda *a: steps.append(a))
    folder = tmp_path / "out" / "tiny"
    for name in ("report.html", "report.md", "metrics.csv", "summary.json", "repro.sh"):
        assert (folder / name).is_file(), name
    assert result.cases[0]["report"] == str(folder / "report.html")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["invocation"]["case"] == "tiny" and summary["report"] == rep
    assert " -m parity run tiny --device cpu --golden auto " in (folder / "repro.sh").read_text()
    # the case's steps reach the callback, prefixed with the case's name
    heard[0]("engine steps", 3, None)
    assert steps == [("tiny: engine steps", 3, None)]


def test_ci_installs_chromium_only_when_missing_and_fails_without_it():
    ci = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"if \[ ! -x /usr/bin/chromium \]; then\n(.*?)\nfi\n", ci, re.S)
    assert block, ".ci/run does not install chromium when /usr/bin/chromium is missing"
    assert "DEBIAN_FRONTEND=noninteractive" in block[1] and "apt-get -qq install -y chromium" in block[1]
    assert "exit 1" in block[1]  # a failed install fails CI instead of silently skipping the browser check
    assert ci.index("/usr/bin/chromium") < ci.index(".venv/bin/python -m pytest")

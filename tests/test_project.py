"""Project-level promises: the README's commands, CI running exactly the README's test command, the main job."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_two_setup_and_run_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith(".venv/bin/parity run")
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
    for c in commands:
        assert c.startswith("python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e ")


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_constraints_pin_torch_exactly():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"] == "2.13.0" and pins["triton"] == "3.6.0"


def _cli():
    import cli

    cli._register()
    return cli.app


def test_main_job_on_the_builtin_case(tmp_path):
    result = CliRunner().invoke(_cli(), ["run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PASSED | tiny" in result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["exact"]
    assert len(report["modules"]) == 14 and all(m["bitwise_requests"] == m["requests"] == 4 for m in report["modules"])
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").is_file()


def test_main_job_names_a_planted_bug_and_exits_1(tmp_path, monkeypatch):
    import parity.optimized.model as opt_model

    window_idx = opt_model._window_idx

    def off_by_one(start, n, window):
        # every window entry reads the position before the one it names
        idx = window_idx(start, n, window)
        return torch.where(idx > 0, idx - 1, idx)

    monkeypatch.setattr(opt_model, "_window_idx", off_by_one)
    result = CliRunner().invoke(_cli(), ["run", "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "FAILED | tiny" in result.output
    assert "first divergence: layers.0.attn" in result.output
    assert not json.loads((tmp_path / "parity.json").read_text())["passed"]


def test_bad_case_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model]\npreset = "tiny"\n[[requests]]\nprompt_len = 0\ndecode_steps = 1\n')
    expected = {
        "no-such-case": "unknown case 'no-such-case'",
        str(bad): "requests[0].prompt_len must be an integer >= 1",
        str(tmp_path / "missing.toml"): "no such case file",
    }
    for arg, message in expected.items():
        proc = subprocess.run([sys.executable, "-m", "parity", "run", arg], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr


def test_main_job_dumps_are_comparable(tmp_path):
    """`parity run --dump` twice: the two engine dumps line up record for record and compare bitwise (exit 0)."""
    app = _cli()
    for name in ("a", "b"):
        result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "report"), "--dump", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--exact"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output

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


SMALL = """name = "small"
[model]
preset = "tiny"
seed = 0
[[requests]]
prompt_len = 37
decode_steps = 3
[[requests]]
prompt_len = 9
decode_steps = 3
[engine]
chunk_size = 16
token_budget = 24
mtp_draft = 1
decode_exact_chunks = true
"""


def small_case(tmp_path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def test_main_job_on_the_builtin_case(tmp_path):
    result = CliRunner().invoke(_cli(), ["run", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "PASSED | tiny" in result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and report["exact"] and report["noise"] == "decode-exact"
    sites = {r["site"] for r in report["sites"] if r["compared"]}
    assert {"layers.0.attn.output", "layers.1.attn.indexer.topk", "layers.2.attn.compressor.entries"} <= sites
    assert {"mtp.0.hc_post_ffn", "output_logits", "mtp.0.output_logits"} <= sites
    assert all(r["bitwise"] for r in report["sites"])
    assert len(report["requests"]) == 4 and all(r["greedy_equal"] for r in report["requests"])
    assert (tmp_path / "checkpoint" / "model.safetensors.index.json").is_file()


def test_main_job_names_a_planted_bug_and_exits_1(tmp_path, monkeypatch):
    import parity.optimized.model as opt_model

    window_idx = opt_model._window_idx

    def off_by_one(positions, window):
        # every window entry reads the position before the one it names
        idx = window_idx(positions, window)
        return torch.where(idx > 0, idx - 1, idx)

    monkeypatch.setattr(opt_model, "_window_idx", off_by_one)
    result = CliRunner().invoke(_cli(), ["run", str(small_case(tmp_path)), "--out", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "FAILED | small" in result.output
    assert "first divergence: layer 0 attention core (layers.0.attn.o_lora" in result.output
    report = json.loads((tmp_path / "parity.json").read_text())
    assert not report["passed"] and report["location"].startswith("layer 0 attention core")


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


def test_main_job_dumps_are_comparable_and_judged_again(tmp_path):
    """`parity run --dump` twice: the two engine dumps line up record for record and compare bitwise (exit 0);
    the reference is laid out like the engine, so it compares record for record too; `parity judge` gives the
    same verdict offline."""
    app = _cli()
    case = str(small_case(tmp_path))
    for name in ("a", "b"):
        result = CliRunner().invoke(
            app, ["run", case, "--out", str(tmp_path / "report"), "--dump", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
    a, b = tmp_path / "a", tmp_path / "b"
    result = CliRunner().invoke(app, ["compare", str(a / "chained"), str(b / "chained"), "--exact"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["compare", str(a / "reference"), str(a / "chained"), "--exact"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["judge", str(a), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["passed"] is True

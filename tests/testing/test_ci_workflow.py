"""The GitHub Actions template `.github/workflows/kernel-parity.yml`: it parses, has the GPU job and the CPU
fallback, installs the CPU job with constraints.txt (the GPU job on the image's own CUDA torch), runs `parity gate`
on a suite, runs the GPU cases on CUDA, uploads reports/ from both jobs even when the gate fails; the suite it
writes by default is one `parity gate` accepts. `problems()` is the check; planted breakages must trip it."""

import shlex
from pathlib import Path

import pytest
import yaml  # a dependency of the test extra (transformers, accelerate)

from parity.gate import load_suite

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "kernel-parity.yml"


def steps_run(job: dict) -> str:
    return "\n".join(s.get("run", "") for s in job.get("steps", []))


def problems(wf: dict) -> list[str]:
    """What is wrong with a parsed workflow, as one line each (empty: none)."""
    found = []
    if not {"pull_request", "push"} <= set(wf.get(True, {}) or {}):  # YAML 1.1 reads the key `on` as True
        found.append("not run on pull requests and pushes")
    jobs = wf.get("jobs", {})
    if set(jobs) != {"gpu", "cpu"}:
        return found + [f"jobs {sorted(jobs)}, expected gpu and cpu"]
    gpu, cpu = jobs["gpu"], jobs["cpu"]
    if "gpu" not in gpu.get("runs-on", []):
        found.append("the gpu job does not ask for a GPU runner label")
    run = steps_run(cpu)
    if "pip install -q -c constraints.txt -e ." not in run:
        found.append("the cpu job does not install with constraints.txt")
    if '.venv/bin/parity gate "$SUITE" --out reports/gate' not in run:
        found.append("the cpu job does not run parity gate on the suite")
    run = steps_run(gpu)
    if "pip install --no-deps -e ." not in run or "-c constraints.txt -e" in run:
        found.append("the gpu job would replace the image's CUDA torch")
    if "--device cuda" not in run:
        found.append("the gpu job does not run on CUDA")
    for name, job in jobs.items():
        ups = [s for s in job.get("steps", []) if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
        ok = [u for u in ups if u.get("if") == "always()" and u.get("with", {}).get("path") == "reports/"]
        if not ok:
            found.append(f"the {name} job does not upload reports/ whatever the outcome")
    env = wf.get("env", {})
    for path in [*env.get("PARITY_GPU_CASES", "").split(), env.get("PARITY_GPU_CALIBRATION", "")]:
        if not path or not (ROOT / path).is_file():
            found.append(f"the gpu job names a file that is not in the repo: {path!r}")
    return found


def test_the_workflow_has_no_problems():
    assert problems(yaml.safe_load(WORKFLOW.read_text())) == []


@pytest.mark.parametrize(
    "old, new, problem",
    [
        ("if: always()", "if: success()", "upload reports/"),
        ("-c constraints.txt -e .", "-e .", "constraints.txt"),
        ('parity gate "$SUITE"', "parity run", "parity gate"),
        ("--no-deps -e .", "-c constraints.txt -e .", "CUDA torch"),
        ("--device cuda --calibration", "--device cpu --calibration", "on CUDA"),
        ("runs-on: [self-hosted, gpu]", "runs-on: [self-hosted]", "GPU runner label"),
        ('"cases/batched.toml"', '"cases/nope.toml"', "not in the repo"),
    ],
)
def test_planted_breakages_are_caught(old, new, problem):
    text = WORKFLOW.read_text()
    assert old in text
    found = problems(yaml.safe_load(text.replace(old, new, 1)))
    assert any(problem in p for p in found), found


def test_the_default_suite_is_valid(tmp_path):
    run = steps_run(yaml.safe_load(WORKFLOW.read_text())["jobs"]["cpu"])
    (printf,) = [line.strip() for line in run.splitlines() if line.strip().startswith("printf")]
    text = shlex.split(printf)[1].encode().decode("unicode_escape")  # printf's \n
    suite = tmp_path / "kernel-parity.toml"
    suite.write_text(text)
    spec = load_suite(suite)
    assert spec.name == "kernel-parity" and [c.name for c in spec.cases] == ["tiny"]

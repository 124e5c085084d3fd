"""The pytest plugin as a kernel project uses it: a scratch project in tmp_path whose test calls
`assert_parity("tiny")`, run by pytest in a fresh interpreter with nothing but the installed plugin (entry point
`pytest11`, no conftest). Clean, it passes; with a planted op bug (`--parity-plant`), the same test fails and its
message names the failing layer, site and phase, and the kernel repro `repro_dir` asked for. Two runs of the tiny
case and one extraction in all."""

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points

import pytest

BUG = "wo_a-per-tensor-scale"
TESTS = """
    import pytest

    from parity.testing import assert_parity


    def test_tiny(parity_case, parity_checkpoint, tmp_path):
        case = parity_case("tiny")
        assert_parity(case, checkpoint=parity_checkpoint(case), repro_dir=tmp_path)


    @pytest.mark.gpu
    def test_tiny_cuda():
        assert_parity("tiny", device="cuda")


    def test_plant_fixture(parity_plant, pytestconfig):
        assert parity_plant == pytestconfig.getoption("--parity-plant")
"""


def pytest_in(project, *args) -> dict[str, tuple[str, str]]:
    """Run pytest on `project` in a fresh interpreter; test name -> (outcome, message) from its JUnit XML."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["OMP_NUM_THREADS"] = "1"
    xml = project / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert xml.exists(), proc.stdout + proc.stderr
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, node.get("message", "")
        results[case.get("name")] = (outcome, message)
    return results


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_project")
    (root / "test_kernels.py").write_text(textwrap.dedent(TESTS))
    return root


def test_the_plugin_is_registered_for_pytest():
    assert "parity.testing" in [e.value for e in entry_points(group="pytest11")]


def test_clean_run_passes_and_gpu_test_skips(project):
    results = pytest_in(project)
    assert results["test_tiny"] == ("passed", ""), results
    assert results["test_plant_fixture"] == ("passed", "")
    outcome, why = results["test_tiny_cuda"]
    import torch

    assert outcome == ("passed" if torch.cuda.is_available() else "skipped"), results
    assert torch.cuda.is_available() or "CUDA" in why


def test_planted_bug_fails_naming_the_site(project):
    results = pytest_in(project, "--parity-plant", BUG, "-k", "tiny and not cuda or plant_fixture")
    outcome, message = results["test_tiny"]
    assert outcome == "failure", results
    assert "layer 0" in message and "layers.0.attn.o_lora" in message and "phase prefill" in message, message
    assert f"planted bug {BUG!r}" in message
    # repro_dir: the failing op's kernel repro, written and named in the message
    assert "kernel repros: " in message and message.rstrip().endswith("repro/repro_o_lora.py"), message
    assert results["test_plant_fixture"] == ("passed", "")

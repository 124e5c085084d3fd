"""CLI usage errors, typer's own included: one `error:` line and exit 2, never a usage box or a traceback."""

import pytest
import torch

from tests.badinput.conftest import assert_bad_input
from tests.commands.conftest import parity_subprocess

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("args", "culprits"),
    [
        pytest.param(("compare", "--bogus", "x", "y"), ("No such option: --bogus", "compare --help"), id="option"),
        pytest.param(("compare",), ("Missing argument", "compare --help"), id="missing-arg"),
        pytest.param(("comapre", "x", "y"), ("No such command 'comapre'",), id="command"),
        pytest.param(("run", "--threads", "x"), ("--threads", "valid integer"), id="threads-not-int"),
        pytest.param(("run", "--threads", "0"), ("--threads", "greater than or equal to 1"), id="threads-0"),
        pytest.param(("compare", "x", "y", "--top-k", "-1"), ("--top-k",), id="top-k"),
        pytest.param(("compare", "x", "y", "--limit", "-1"), ("--limit",), id="limit"),
        pytest.param(("bisect", "x", "y", "--limit", "-1"), ("--limit",), id="bisect-limit"),
        pytest.param(("bisect", "x", "y", "--limit", "x"), ("--limit", "valid integer"), id="bisect-limit-not-int"),
        pytest.param(("calibrate", "tiny", "--out", "n.json", "--variations", "0"), ("--variations",), id="variations"),
        pytest.param(("run", "--device", "gpu0"), ("--device 'gpu0'", "cpu or cuda"), id="device"),
        pytest.param(("run", "--device", "meta"), ("--device 'meta'", "cpu or cuda"), id="device-meta"),
        pytest.param(("run", "--golden", "sometimes"), ("--golden", "'sometimes'"), id="golden"),
        pytest.param(("selftest", "--device", "gpu0"), ("--device 'gpu0'", "cpu or cuda"), id="selftest-device"),
        pytest.param(
            ("calibrate", "cases/batched.toml", "--out", "n.json", "--device", "gpu0"),
            ("--device 'gpu0'", "cpu or cuda"),
            id="calibrate-device",
        ),  # fmt: skip
        pytest.param(
            ("run", "--calibration", "nosuch.json"), ("nosuch.json", "no such calibration file"), id="run-calibration"
        ),  # fmt: skip
        pytest.param(
            ("selftest", "--calibration", "nosuch.json"),
            ("nosuch.json", "no such calibration file"),
            id="selftest-calibration",
        ),  # fmt: skip
        pytest.param(("selftest", "--loosen", "nan"), ("--loosen", "nan"), id="loosen-nan"),
        pytest.param(("gate", "x.toml", "--regression", "2"), ("x.toml",), id="suite-missing"),
        pytest.param(("compare", "x", "y", "--json", "--csv"), ("--json and --csv",), id="json-csv"),
        pytest.param(("compare", "x", "y", "--phase", "warmup"), ("--phase warmup",), id="phase"),
        pytest.param(("run", "nosuch"), ("unknown case 'nosuch'",), id="case-name"),
    ],
)
def test_usage_errors_are_one_line(parity_cli, args, culprits):
    assert_bad_input(parity_cli(*args), *culprits)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: --device cuda is valid here")
def test_cuda_on_a_machine_without_it(parity_cli):
    assert_bad_input(parity_cli("run", "--device", "cuda"), "--device 'cuda'", "no CUDA device")


def test_a_ranges_option_with_garbage(parity_cli, ref):
    assert_bad_input(parity_cli("compare", ref, ref, "--steps", "3-x"), "--steps")


def test_a_bad_regex_option(parity_cli, ref):
    assert_bad_input(parity_cli("compare", ref, ref, "--name", "("), "'('", "not a valid regex")


def test_a_terminal_user_sees_one_line_not_a_box():
    """What a user's terminal shows (a fresh interpreter, not the in-process runner)."""
    r = parity_subprocess("compare", "--bogus", "a", "b")
    assert_bad_input(r, "No such option: --bogus")


def test_help_still_works(parity_cli):
    r = parity_cli("compare", "--help")
    assert r.code == 0 and "--allow-dtype-change" in r.out


def test_selftest_names_the_one_bad_option(parity_cli):
    line = assert_bad_input(parity_cli("selftest", "--loosen", "0.5"), "--loosen", "0.5")
    assert "--repeats" not in line
    line = assert_bad_input(parity_cli("selftest", "--repeats", "-1"), "--repeats", "-1")
    assert "--loosen" not in line


def test_paths_of_the_wrong_kind_say_so(parity_cli, tmp_path):
    """A file where a dir is expected, a dir where a file is, a missing dir: the message names the path and the
    kind expected, never an OS error string with the joined child path."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = assert_bad_input(parity_cli("judge", a_file), str(a_file), "not a directory")
    assert "run.json" not in line and "Errno" not in line
    assert_bad_input(parity_cli("judge", tmp_path / "nodir"), "nodir", "no such dir")
    line = assert_bad_input(parity_cli("gate", tmp_path), str(tmp_path), "a directory; expected a suite .toml")
    assert "Errno" not in line


def test_a_case_file_without_a_suffix_is_read_as_a_case(parity_cli, tmp_path, monkeypatch):
    """`parity run mycase` with a file `mycase` here reads it (and names it), not 'unknown built-in case'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mycase").write_text('name = "x"\n')
    assert_bad_input(parity_cli("run", "mycase", "--out", tmp_path / "out"), "mycase", "[[requests]]")


def test_a_thread_count_torch_would_crash_on(tmp_path):
    """torch's pools die with SIGSEGV on absurd counts: refused first (in a fresh interpreter, so a regression is
    a failed test, not a crashed test run)."""
    r = parity_subprocess("run", "--threads", "100000", "--out", tmp_path / "out")
    assert_bad_input(r, "--threads 100000", "expected at most")
    assert not (tmp_path / "out").exists()

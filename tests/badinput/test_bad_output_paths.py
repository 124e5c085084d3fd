"""Output paths are checked before the work starts: a path under a file, a dir where a file goes, a non-empty
--dump, an unwritable dir. A refused command leaves what was there intact, and a failed write (a full disk)
replaces nothing."""

import errno
import os

import pytest

from parity.errors import ParityError
from parity.io import atomic_write
from tests.badinput.conftest import assert_bad_input, copy_dump, tree

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def test_compare_out_under_a_file(parity_cli, ref, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_bad_input(parity_cli("compare", ref, ref, "--out", f / "r.json"), "--out", f"{f} is a file")
    assert f.read_text() == "keep"


def test_compare_out_is_a_dir(parity_cli, ref, tmp_path):
    (tmp_path / "r.json").mkdir()
    assert_bad_input(parity_cli("compare", ref, ref, "--out", tmp_path / "r.json"), "--out", "is a directory")


def test_an_existing_report_survives_a_refused_command(parity_cli, ref, tmp_path):
    report = tmp_path / "r.json"
    report.write_text('{"old": true}')
    bad = copy_dump(ref, tmp_path / "bad")
    (bad / "manifest.jsonl").write_text("not json\n")
    assert_bad_input(parity_cli("compare", ref, bad, "--out", report), "manifest.jsonl line 1")
    assert report.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


def test_run_dump_into_a_non_empty_dir(parity_cli, tmp_path):
    d = tmp_path / "dump"
    d.mkdir()
    (d / "mine.txt").write_text("keep")
    out = tmp_path / "out"
    assert_bad_input(parity_cli("run", "--dump", d, "--out", out), "--dump", "not empty")
    assert tree(d) == {"mine.txt": b"keep"} and not out.exists()


def test_run_out_under_a_file_fails_before_the_checkpoint(parity_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_bad_input(parity_cli("run", "--out", f / "reports"), "--out", "is a file")
    assert f.read_text() == "keep"


def test_run_dump_is_a_file(parity_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_bad_input(parity_cli("run", "--dump", f, "--out", tmp_path / "out"), "--dump", "not a directory")
    assert f.read_text() == "keep" and not (tmp_path / "out").exists()


def test_gate_and_calibrate_outputs(parity_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    suite = tmp_path / "suite.toml"
    suite.write_text('name = "s"\ncases = ["tiny"]\n')
    assert_bad_input(parity_cli("gate", suite, "--out", f), "--out", "not a directory")
    assert_bad_input(parity_cli("calibrate", "tiny", "--out", tmp_path), "--out", "is a directory")
    assert_bad_input(parity_cli("selftest", "tiny", "--out", f / "x"), "--out", "is a file")


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only dirs: the refusal cannot be provoked")
def test_a_read_only_dir(parity_cli, ref, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_bad_input(parity_cli("compare", ref, ref, "--out", ro / "r.json"), "--out", "Permission denied")
        assert_bad_input(parity_cli("run", "--out", ro / "reports"), "--out", "Permission denied")
    finally:
        ro.chmod(0o755)


def test_a_full_disk_replaces_nothing_and_names_the_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def full(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(ParityError, match="report.json: cannot write .No space left on device.; nothing was replaced"):
        atomic_write(target, full)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"] and target.read_text() == "old"


def test_an_unwritable_dir_is_found_by_probing(parity_cli, ref, tmp_path, monkeypatch):
    """What a read-only mount or an ACL does (and root cannot provoke with chmod): the probe file cannot be made."""
    import parity.io

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(parity.io.tempfile, "TemporaryFile", refuse)
    line = assert_bad_input(parity_cli("compare", ref, ref, "--out", tmp_path / "r.json"), "--out", "Permission denied")
    assert f"cannot write in {tmp_path}" in line and list(tmp_path.iterdir()) == []


def test_an_existing_noise_model_survives_a_refused_calibration(parity_cli, tmp_path):
    out = tmp_path / "noise.json"
    out.write_text('{"old": true}')
    assert_bad_input(parity_cli("calibrate", tmp_path / "nosuch.toml", "--out", out), "nosuch.toml")
    assert_bad_input(parity_cli("calibrate", "tiny", "--out", out, "--device", "gpu"), "--device 'gpu'")
    assert out.read_text() == '{"old": true}' and [p.name for p in tmp_path.iterdir()] == ["noise.json"]


def test_tp_out_is_checked_before_the_one_process_run(parity_cli, tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    assert_bad_input(parity_cli("tp", "--out", f / "sub"), "--out", f"{f} is a file")
    assert f.read_text() == "keep" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_a_synthetic_checkpoint_that_cannot_fit_is_refused_before_a_byte_is_written(tmp_path):
    """A vocabulary at the int32 bound: a 1 TiB embedding, more than this disk holds or (on a disk that large) than
    this machine's memory holds for its shard. Refused naming the tensor's shape, the dir left empty."""
    from parity.checkpoint import write_checkpoint
    from parity.config import ModelArgs

    with pytest.raises(ParityError, match=r"GiB.*\[2147483647, 256\]") as e:
        write_checkpoint(tmp_path / "ckpt", ModelArgs.tiny(vocab_size=2**31 - 1))
    assert "\n" not in str(e.value) and not (tmp_path / "ckpt").exists()

"""`parity tp` refuses bad input in one line (exit 2) before it writes anything or starts a process. Its full run is
the path `test_tensor_parallel.py` checks through the package (`capture.tp`), at a fraction of the cost."""

import sys

import pytest

import cli as cli_module


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["parity", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        cli_module.main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--world-size", "1"], "--world-size 1: expected >= 2"),
        (["--plant-offset", "one:wq_b:x"], "--plant-offset 'one:wq_b:x': expected RANK:PARAM_REGEX:ROWS"),
        (["--backend", "nccl"], "tensor parallel backend 'nccl' on device 'cpu': use 'gloo' there"),
        (["--backend", "mpi"], "tensor parallel backend 'mpi': expected one of gloo, nccl"),
        (["no-such-case"], "unknown case 'no-such-case'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, message):
    code, text = _cli(monkeypatch, capsys, "tp", "--out", tmp_path / "out", *args)
    assert code == 2 and message in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_used_output_dir_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    (tmp_path / "out" / "one").mkdir(parents=True)
    (tmp_path / "out" / "one" / "manifest.jsonl").write_text("")
    code, text = _cli(monkeypatch, capsys, "tp", "--out", tmp_path / "out")
    assert code == 2 and "out/one: not an empty dir" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one"]  # no checkpoint written

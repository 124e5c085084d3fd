"""The `parity` CLI in-process: argv set, exit code and output captured."""

import sys

import pytest

import cli as cli_module


@pytest.fixture
def parity_cli(monkeypatch, capsys):
    """`parity_cli(*args) -> (exit code, stdout, stderr)`: `cli.main()` with argv set."""
    if not any(c.name == "repro" for c in cli_module.app.registered_commands):
        cli_module._register()
    monkeypatch.setattr(cli_module, "_register", lambda: None)

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["parity", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            cli_module.main()
        captured = capsys.readouterr()
        return exc.value.code, captured.out, captured.err

    return invoke

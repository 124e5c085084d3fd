"""Run the `parity` CLI in-process (fast) or as a subprocess (to see exactly what a user sees), and toy dumps."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import cli as cli_module
from parity import dump
from tests.dump.toymodel import Fault, ToyLM, prompts, run

ROOT = Path(__file__).resolve().parents[2]
# every block and its two sub-modules, so verdicts can name the sub-module
DUMP = dict(modules=r"^layers\.\d+(\.(attn|ffn))?$|^head$")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def parity_cli(monkeypatch, capsys):
    """`parity_cli(*args) -> Result`: `cli.main()` with argv set; exit code, stdout and stderr."""
    if not any(c.name == "bisect" for c in cli_module.app.registered_commands):
        cli_module._register()
    monkeypatch.setattr(cli_module, "_register", lambda: None)

    def invoke(*args) -> Result:
        monkeypatch.setattr(sys, "argv", ["parity", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            cli_module.main()
        captured = capsys.readouterr()
        return Result(exc.value.code, captured.out, captured.err)

    return invoke


def parity_subprocess(*args) -> Result:
    """`python -m parity ...` in a fresh interpreter: what a user's terminal shows."""
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run(
        [sys.executable, "-m", "parity", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def toy_dumps(tmp_path_factory):
    """Dump dirs of the toy model: `ref`, `same` (an identical run), and `fault(layer, phase, kind)` on demand."""
    root = tmp_path_factory.mktemp("toy_dumps")
    inputs = prompts(batch=2, seq=5, decode_steps=2)

    def make(name: str, model: ToyLM, **config) -> Path:
        path = root / name
        if not path.exists():
            run(model, *inputs, dump.DumpConfig(dir=path, **(DUMP | config)), requests=["a", "b"])
        return path

    class Dumps:
        ref = make("ref", ToyLM())
        same = make("same", ToyLM())

        @staticmethod
        def fault(layer: int, phase: str, kind: str = "ffn-scale") -> Path:
            return make(f"{kind}-{phase}-{layer}", ToyLM(fault=Fault(layer, phase, kind)))

        @staticmethod
        def custom(name: str, model: ToyLM, **config) -> Path:
            return make(name, model, **config)

    return Dumps


@pytest.fixture
def write_untagged():
    """A dump made without any seq layout tag (nothing for slot-invariance to cut)."""

    def write(root: Path) -> Path:
        model = ToyLM()
        with dump.install(model, dump.DumpConfig(dir=root / "untagged", **DUMP)), dump.phase("prefill"):
            model(prompts(batch=2, seq=3)[0])
        return root / "untagged"

    return write

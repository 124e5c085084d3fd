"""One failing run (a planted selftest bug) and one passing run of the built-in tiny case, each a report folder,
shared by every test of this package: `parity run` as a user runs it, in a fresh interpreter."""

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUG = "route-scale-dropped"  # layer 0, the MoE gate, from the first prefill chunk on


@dataclass
class Run:
    folder: Path
    code: int
    out: str
    err: str


def parity(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "parity", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _run(folder: Path, *args) -> Run:
    p = parity("run", *args, "--out", folder)
    return Run(folder, p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def failing(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("report") / "failing", "--plant", BUG)


@pytest.fixture(scope="session")
def passing(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("report") / "passing")

"""Saved repro scripts run as a user runs them: in a fresh interpreter."""

import os
import subprocess
import sys
from pathlib import Path


def run_script(path: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """A saved repro script in a fresh interpreter (`pythonpath` added in front, for a replaced op's module)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=300)

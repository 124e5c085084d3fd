"""The repros under a folder (`parity repro DIR`): find them, describe them, run their scripts.

Each repro is run as its own script in a fresh interpreter (`python repro_<op>.py`), so what passes here is what
the saved script does on its own, not the harness's in-process state.
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityError
from parity.io import read_json


@dataclass(frozen=True)
class Repro:
    name: str  # repro_<op>
    script: Path
    meta: dict

    @property
    def op(self) -> str:
        return self.meta["op"]

    def summary(self) -> str:
        site = self.meta["call_site"]
        state = "reproduced the failure" if self.meta.get("reproduces") else "passed when extracted"
        return (
            f"{self.name}: op {self.op} ({self.meta['result']['candidate']}) at {site['site']} step {site['step']}, "
            f"request {site['request']}, position {site['position']}; {state}"
        )


def find_repros(folder: Path) -> list[Repro]:
    """Every `repro_<op>.json` under `folder` with its script next to it, by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ParityError(f"{folder}: {'not a directory' if folder.exists() else 'no such directory'}")
    found = []
    for meta_path in sorted(folder.rglob("repro_*.json")):
        script = meta_path.with_suffix(".py")
        if not script.is_file():
            raise ParityError(f"{meta_path}: its script {script.name} is missing")
        from parity.repro.replay import check_meta  # torch and the op registry load only here

        meta = read_json(meta_path, f"{meta_path}: no such repro JSON", f"{meta_path}: not a readable repro JSON")
        found.append(Repro(meta_path.stem, script, check_meta(meta, meta_path)))
    return found


def select(repros: list[Repro], names: list[str]) -> list[Repro]:
    """The repros named (by `repro_<op>` or by op); an unknown name is refused listing the valid ones."""
    chosen = []
    for name in names:
        hit = [r for r in repros if name in (r.name, r.op)]
        if not hit:
            raise ParityError(f"--run {name!r}: no such repro; valid: {', '.join(r.name for r in repros) or 'none'}")
        chosen += [r for r in hit if r not in chosen]
    return chosen


def run_script(repro: Repro, backend: str | None = None, device: str | None = None) -> tuple[int, str]:
    """Run the repro's script; its exit code (0 pass, 1 fail, 2 bad input) and its output."""
    cmd = [sys.executable, str(repro.script)]
    if backend:
        cmd += ["--backend", backend]
    if device:
        cmd += ["--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, (proc.stdout + proc.stderr).rstrip()

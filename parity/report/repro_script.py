"""`repro.sh`: reruns the `parity run` that wrote a report folder, from the folder's `invocation`: the same case
(file or built-in name), checkpoint, device, op backends (`PARITY_BACKEND` / `PARITY_OPS`, set or unset as they
were), calibration, golden, bisect, streamed weights and planted bug. It writes a new report folder (default
`reports/<case>/<time>` under the original working dir; extra arguments, e.g. `--out DIR`, are passed on) and exits
as the run does: 1 reproduces a parity failure."""

import shlex
import sys

from parity.report.summary import BACKEND_ENV


def argv(inv: dict) -> list[str]:
    """The `parity run` arguments of an invocation."""
    args = ["run", inv["case"], "--device", inv.get("device", "cpu"), "--golden", inv.get("golden", "auto")]
    for key in ("checkpoint", "calibration", "plant", "threads"):
        if inv.get(key) is not None:
            args += [f"--{key}", str(inv[key])]
    for flag in ("bisect", "stream"):
        if inv.get(flag):
            args.append(f"--{flag}")
    return args


def script(inv: dict) -> str:
    q = shlex.quote
    env = inv.get("env", {})
    lines = [
        "#!/usr/bin/env bash",
        "# Reruns exactly the parity run that wrote this report folder; exit 1 reproduces a parity failure.",
        "# Extra arguments go to `parity run` (e.g. --out DIR); PARITY_PYTHON overrides the interpreter that ran it.",
        "set -euo pipefail",
        f"cd {q(inv.get('cwd') or '.')}",
    ]
    for key in BACKEND_ENV:
        lines.append(f"export {key}={q(env[key])}" if key in env else f"unset {key}")
    # no word splitting in an assignment; the quotes of the default are removed by the shell
    lines.append(f"PARITY_PYTHON=${{PARITY_PYTHON:-{q(inv.get('python') or sys.executable)}}}")
    lines.append(f'exec "$PARITY_PYTHON" -m parity {" ".join(q(a) for a in argv(inv))} "$@"')
    return "\n".join(lines) + "\n"

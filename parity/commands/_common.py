"""Helpers shared by the CLI command modules."""

import sys

import torch
import typer
from rich.console import Console
from rich.markup import escape

from parity.errors import ParityError

# stdout for results, stderr for the one-line errors; piped output (CI logs, `| less`) gets wide tables instead of
# rich's 80-column fallback
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def finish(passed: bool, what: str, console: Console | None = out) -> None:
    """A judging command's last line, `PASSED | what` or `FAILED | what` (none when `console` is None), and its
    exit: 1 on a parity failure."""
    if console is not None:
        console.print(f"{'PASSED' if passed else 'FAILED'} | {escape(what)}")
    if not passed:
        raise typer.Exit(EXIT_FAIL)


def check_device(device: str) -> None:
    """A `--device` value both models can run on here: `cpu`, or `cuda[:N]` with that GPU present."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise ParityError(f"--device {device!r}: not a torch device; expected cpu or cuda[:N]") from None
    if d.type not in ("cpu", "cuda"):
        raise ParityError(f"--device {device!r}: expected cpu or cuda[:N], got a {d.type} device")
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ParityError(f"--device {device!r}: this machine has no CUDA device (use --device cpu)")
        if d.index is not None and d.index >= count:
            raise ParityError(f"--device {device!r}: this machine has {count} CUDA device(s), 0..{count - 1}")

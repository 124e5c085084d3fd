"""How the Triton kernels run here: compiled for the CUDA device when there is one, else in Triton's CPU
interpreter with GPU numerics (`interpreter.install()`).

`setup()` must run before triton is first imported in the process: `@triton.jit` reads `TRITON_INTERPRET` when it
decorates a function, and triton's own library functions (`tl.max`, `tl.sum`, ...) are decorated when `triton` is
imported, so a process that imported triton first would mix compiled-mode library functions into interpreted
kernels. The tests set the variable in `tests/conftest.py` for the same reason.
"""

import importlib.util
import os
import sys

import torch

from parity.errors import ParityError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def setup() -> str:
    """Prepare Triton for this process; returns "cuda" or "interpreter"."""
    if importlib.util.find_spec("triton") is None:
        raise ParityError("the triton backend needs the triton package (pip install -c constraints.txt triton)")
    if not interpreting() and torch.cuda.is_available():
        return "cuda"
    if not interpreting() and "triton" in sys.modules:
        raise ParityError(
            "triton backend without a GPU: triton was imported before its CPU interpreter could be chosen; "
            "set TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    from parity.optimized.ops.triton import interpreter

    interpreter.install()
    return "interpreter"

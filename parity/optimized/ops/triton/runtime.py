"""How the Triton kernels run here: compiled for the CUDA device when there is one, else in Triton's CPU
interpreter with GPU numerics (`interpreter.install()`).

The interpreter must be chosen before triton is first imported in the process: `@triton.jit` reads
`TRITON_INTERPRET` when it decorates a function, and triton's own library functions (`tl.max`, `tl.sum`, ...) are
decorated when `triton` is imported, so a process that imported triton first would mix compiled-mode library
functions into interpreted kernels. `choose_interpreter_early()` runs when `parity` is imported for that reason.
"""

import functools
import importlib.util
import os
import sys
import warnings

import torch

from parity.errors import ParityError


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# host-side grid and tile arithmetic: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions whose
# wrapper costs ~2 us a call on the host (measured here: 1.9 us against 0.03 us), and a decode step's eager middle
# makes ~65 of them; these give the same values for the non-negative ints the launches pass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for 0, like `triton.next_power_of_2`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (the interpreter: 1, so no launch splits or spreads on its account)."""
    if device.type != "cuda" or interpreting():
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def choose_interpreter_early() -> None:
    """Without a CUDA device, select Triton's interpreter before triton is imported (called when `parity` is
    imported: torch imports triton on its own the first time a model is built on the meta device). Nothing else
    changes: without a GPU, triton has no other way to run, and an explicit TRITON_INTERPRET is kept."""
    if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def setup() -> str:
    """Prepare Triton for this process; returns "cuda" or "interpreter"."""
    if importlib.util.find_spec("triton") is None:
        raise ParityError("the triton backend needs the triton package (pip install -c constraints.txt triton)")
    if not interpreting() and torch.cuda.is_available():
        import triton

        # scratch for the tensor descriptors kernels make on the device (fp8_gemm's prefill TMA loads): a few
        # hundred bytes a launch from torch's caching allocator on the launch's stream (graph capture included)
        triton.set_allocator(_descriptor_scratch)
        return "cuda"
    if not interpreting() and "triton" in sys.modules:
        raise ParityError(
            "triton backend without a GPU: triton was imported before its CPU interpreter could be chosen; "
            "set TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    from parity.optimized.ops.triton import interpreter

    interpreter.install()
    # the interpreter evaluates masked-off lanes too (e.g. -inf - -inf in an online softmax's padding) and numpy
    # warns about each; the kernels never store those lanes, and the warnings would bury the run's own output
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    return "interpreter"

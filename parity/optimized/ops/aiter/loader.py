"""How AMD aiter's Triton kernels are imported: a plain `import aiter` on ROCm, the documented bypass elsewhere.

aiter (`amd-aiter` on PyPI, pinned `AITER_VERSION`) is a ROCm package: its `aiter/__init__.py` loads HIP/CK
extensions and raises without ROCm ("ROCm version file not found"). Its Triton kernels (`aiter.ops.triton.*`) are
plain Triton and run compiled on an NVIDIA GPU or in Triton's CPU interpreter, with three shims, each needed and
nothing else (measured on an H200, /work/shared/research/env_feasibility.md §6; tests/optimized/ops/
test_aiter_loader.py fails when one is removed):

1. package bypass: `aiter` and `aiter.ops` become empty module objects whose `__path__` is the installed folders,
   so `import aiter.ops.triton.gemm_a8w8_blockscale` finds the real files but `aiter/__init__.py` and
   `aiter/ops/__init__.py` (the ROCm-only parts) never run;
2. arch query: `arch_info.get_arch()` asks the active driver for an AMD arch (and falls back to JAX); off ROCm it
   answers `STUB_ARCH` ("gfx942", "MI300X") so the kernels' config loaders find the MI300X tuning tables (tuned for
   AMD, not for Hopper: block sizes only, no numeric effect beyond the split-K choice, which the adapters pin);
3. launch options: those tables carry AMD-only compiler options (`AMD_ONLY_LAUNCH_OPTIONS`) that triton's CUDA
   backend rejects ("KeyError: Keyword argument waves_per_eu was specified but unrecognised"); the kernels of every
   aiter module loaded through `load()` drop them at launch.

Where aiter comes from: `PARITY_AITER_PATH` (a folder holding the `aiter` package, e.g. made with `pip install
--no-deps --target DIR amd-aiter==0.1.7.post2.dev18`; for GPU boxes without network, where the folder travels with
the repo) or else the installed distribution. Selecting the backend where neither a ROCm import nor the bypass
works is a one-line `ParityError`.
"""

import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import torch

from parity.errors import ParityError

AITER_VERSION = "0.1.7.post2.dev18"
AITER_PATH_ENV = "PARITY_AITER_PATH"
AMD_ONLY_LAUNCH_OPTIONS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
STUB_ARCH = ("gfx942", "MI300X")  # (arch, device name of aiter's tuning-table files)
STUB_MARK = "__parity_stub__"  # set on the stub package modules
SHIM_MARK = "__parity_launch_shim__"  # set on an aiter module whose kernels launch through the shim

_MODE: list[str] = []  # the mode `setup()` chose: "rocm" | "cuda" | "interpreter"


def rocm() -> bool:
    return torch.version.hip is not None


def _install_hint() -> str:
    return (
        f"pip install --no-deps amd-aiter=={AITER_VERSION}, or set {AITER_PATH_ENV} to a folder holding the aiter "
        f"package (pip install --no-deps --target DIR amd-aiter=={AITER_VERSION})"
    )


def aiter_dir() -> Path:
    """The installed `aiter` package folder (from `PARITY_AITER_PATH` first), without running its `__init__`."""
    env = os.environ.get(AITER_PATH_ENV)
    if env:
        folder = Path(env).resolve()  # absolute: sys.path must not depend on the working directory
        if not (folder / "aiter" / "__init__.py").is_file():
            raise ParityError(f"{AITER_PATH_ENV}={env}: expected a folder holding the aiter package, found no aiter/")
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        return folder / "aiter"
    spec = importlib.machinery.PathFinder.find_spec("aiter")  # finds, never executes
    if spec is None or not spec.submodule_search_locations:
        raise ParityError(f"the aiter backend needs AMD aiter's Triton kernels: {_install_hint()}")
    return Path(spec.submodule_search_locations[0])


def _stub_packages(root: Path) -> None:
    """Shim 1: `aiter` and `aiter.ops` as bare packages over the installed folders (their __init__ never runs)."""
    for name, folder in (("aiter", root), ("aiter.ops", root / "ops")):
        mod = sys.modules.get(name)
        if mod is not None:
            if getattr(mod, STUB_MARK, False):
                continue
            raise ParityError(f"aiter backend: {name} was already imported normally in this non-ROCm process")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        mod = types.ModuleType(name, "parity stub: the ROCm-only package __init__ is bypassed (aiter/loader.py)")
        mod.__spec__, mod.__path__ = spec, [str(folder)]
        setattr(mod, STUB_MARK, True)
        sys.modules[name] = mod
    sys.modules["aiter"].ops = sys.modules["aiter.ops"]


def _map_arch() -> None:
    """Shim 2: aiter's arch query answers MI300X, whose tuning tables exist (there are none for NVIDIA)."""
    arch_info = importlib.import_module("aiter.ops.triton.utils._triton.arch_info")
    arch_info.get_arch = lambda: STUB_ARCH[0]
    arch_info.get_device = lambda: STUB_ARCH[1]


def without_amd_options(kwargs: dict) -> dict:
    """Shim 3: a kernel launch's keyword arguments less the AMD-only compiler options."""
    return {k: v for k, v in kwargs.items() if k not in AMD_ONLY_LAUNCH_OPTIONS}


class _LaunchWithoutAmdOptions:
    """An aiter kernel whose `kernel[grid](...)` launches pass through `without_amd_options`."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **without_amd_options(kwargs))

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def _strip_launch_options(module) -> None:
    from triton.runtime.jit import KernelInterface

    for name, value in list(vars(module).items()):
        if isinstance(value, KernelInterface):
            setattr(module, name, _LaunchWithoutAmdOptions(value))


def setup() -> str:
    """Make aiter's Triton kernels importable in this process; returns "rocm", "cuda" or "interpreter"."""
    if _MODE:
        return _MODE[0]
    if rocm():
        try:
            importlib.import_module("aiter")
        except Exception as e:  # noqa: BLE001 - any failure of a third-party import is reported in one line
            raise ParityError(f"the aiter backend on ROCm: import aiter failed ({type(e).__name__}: {e})") from None
        _MODE.append("rocm")
        return "rocm"
    root = aiter_dir()
    from parity.optimized.ops.triton import runtime

    mode = runtime.setup()  # compiled on CUDA, else the interpreter with GPU numerics (interpreter.py)
    _stub_packages(root)
    try:
        _map_arch()
    except Exception as e:  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
        raise ParityError(f"the aiter backend: aiter's Triton utilities do not import ({why})") from None
    _MODE.append(mode)
    return mode


def load(module: str, function: str):
    """`function` of aiter's `module` (e.g. "aiter.ops.triton.gemm_a8w8_blockscale"), after `setup()`; off ROCm the
    module's kernels launch without the AMD-only options."""
    mode = setup()
    mod = importlib.import_module(module)
    if mode != "rocm" and not getattr(mod, SHIM_MARK, False):
        _strip_launch_options(mod)
        setattr(mod, SHIM_MARK, True)
    return getattr(mod, function)


def available() -> tuple[bool, str]:
    """(True, mode) when the backend can be set up here, else (False, the one-line reason)."""
    try:
        return True, setup()
    except ParityError as e:
        return False, str(e)

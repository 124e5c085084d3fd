"""The aiter loader's three shims (parity/optimized/ops/aiter/loader.py), each proven needed and in place: removing
the package bypass or the launch-option shim makes a test here fail with a message that names it.

- package bypass: the ROCm-only `aiter/__init__.py` never runs (a plain `import aiter` fails on this machine, and
  the loader without its stubs fails with a one-line ParityError naming the ROCm error);
- arch map: aiter's arch query answers MI300X, whose tuning tables exist for the kernels we use;
- launch options: what reaches a kernel launch passes triton's CUDA option check (the check jit.py applies before
  compiling, run here without a GPU); without the shim the tables' `waves_per_eu` etc. would fail it.
"""

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parity.errors import ParityError
from parity.optimized.ops.aiter import loader

_OK, _WHY = loader.available()
ROOT = Path(__file__).resolve().parents[3]
needs_aiter = pytest.mark.skipif(not _OK, reason=f"aiter backend unavailable: {_WHY}")
off_rocm = pytest.mark.skipif(loader.rocm(), reason="ROCm runs the plain `import aiter`: no bypass, no shims")


def cuda_rejects(kernel, kwargs: dict) -> list[str]:
    """The launch keywords triton's CUDA backend would reject ("Keyword argument ... was specified but
    unrecognised", triton/runtime/jit.py `_pack_args`): neither a compiler option for sm_90 nor a kernel argument."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    options = CUDABackend(GPUTarget("cuda", 90, 32)).parse_options(kwargs).__dict__
    return [k for k in kwargs if k not in options and k not in kernel.arg_names]


def test_an_installed_aiter_loads():
    # where amd-aiter is installed (CI) the backend must load: a broken shim must fail here, not skip every aiter test
    if not (os.environ.get(loader.AITER_PATH_ENV) or importlib.machinery.PathFinder.find_spec("aiter")):
        pytest.skip("amd-aiter is not installed here and PARITY_AITER_PATH is unset")
    assert _OK, f"amd-aiter is installed but the aiter backend does not load: {_WHY}"


@needs_aiter
@off_rocm
def test_the_package_bypass_keeps_aiters_rocm_init_out():
    aiter = sys.modules["aiter"]
    assert getattr(aiter, loader.STUB_MARK, False), "aiter was imported without the loader's package bypass"
    assert getattr(sys.modules["aiter.ops"], loader.STUB_MARK, False), "aiter.ops was imported without the bypass"
    # attributes aiter/__init__.py would define (it imports its ROCm ops into the package namespace)
    assert not hasattr(aiter, "dtypes") and not hasattr(aiter, "logger")


@needs_aiter
@off_rocm
def test_without_the_bypass_aiter_does_not_import_here():
    # a fresh process: plain `import aiter` fails off ROCm, and the loader with its stubs removed fails in one line
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(loader.aiter_dir().parent)])}
    code = (
        "import sys\n"
        "from parity.errors import ParityError\n"
        "from parity.optimized.ops.aiter import loader\n"
        "loader._stub_packages = lambda root: None  # the bypass removed\n"
        "try:\n"
        "    loader.setup()\n"
        "except ParityError as e:\n"
        "    print('PARITY_ERROR', e)\n"
        "    sys.exit(3)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3, f"the loader without its package bypass did not fail: {run.stdout[-500:]}"
    line = run.stdout.strip()
    # the full package fails on its ROCm probe ("ROCm version file not found"); the 5 MB Triton-only folder of
    # bench/make_aiter_folder.py on aiter/__init__.py's first missing ROCm module: either way aiter/__init__ ran
    assert line.count("\n") == 0 and "aiter's Triton utilities do not import" in line, line


@needs_aiter
@off_rocm
def test_the_arch_query_answers_mi300x_whose_tables_exist():
    from aiter.ops.triton.utils._triton import arch_info
    from aiter.ops.triton.utils.core import AITER_TRITON_CONFIGS_PATH

    assert (arch_info.get_arch(), arch_info.get_device()) == loader.STUB_ARCH
    for table in ("GEMM-A8W8_BLOCKSCALE", "BATCHED_GEMM-A8W8-A_PER_TOKEN_GROUP_PREQUANT_W_PER_BATCHED_TENSOR_QUANT"):
        assert (Path(AITER_TRITON_CONFIGS_PATH) / "gemm" / f"MI300X-{table}.json").is_file(), table


def _run_both_ops_recording_launches(monkeypatch, launch: bool = True):
    """Run the aiter fp8_gemm and o_lora once; return [(kernel, launch kwargs)] as the innermost launcher got them.
    `launch=False` records without launching: on a GPU triton itself raises at an AMD-only option, before the check
    under test could see it."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from parity.optimized.ops.aiter import fp8_gemm, o_lora

    seen = []
    for cls in (JITFunction, InterpretedFunction):
        real = cls.run

        def spy(self, *args, grid, warmup, _real=real, **kwargs):
            seen.append((self, dict(kwargs)))  # what jit.py checks: the launch keywords besides grid and warmup
            return _real(self, *args, grid=grid, warmup=warmup, **kwargs) if launch else None

        monkeypatch.setattr(cls, "run", spy)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(5, 256).to(torch.float8_e4m3fn).to(dev)
    b = torch.randn(128, 256).to(torch.float8_e4m3fn).to(dev)
    fp8_gemm.fp8_gemm(a, torch.ones(5, 2, device=dev), b, torch.ones(1, 2, device=dev))
    o = torch.randn(5, 256).to(torch.bfloat16).to(dev)
    o_lora.o_lora(o, (torch.randn(256, 128) * 0.1).to(torch.bfloat16).to(dev), 2, 128)
    assert len(seen) == 2, f"expected one launch per op, saw {len(seen)}"
    return seen


def _assert_cuda_accepts(seen):
    for kernel, kwargs in seen:
        bad = cuda_rejects(kernel, kwargs)
        assert not bad, (
            f"aiter kernel {kernel.__name__} launched with {bad}, which triton's CUDA backend rejects (KeyError: "
            "Keyword argument ... was specified but unrecognised): the loader's launch-option shim is missing"
        )


@needs_aiter
@off_rocm
def test_launches_pass_the_cuda_option_check(monkeypatch):
    _assert_cuda_accepts(_run_both_ops_recording_launches(monkeypatch))


@needs_aiter
@off_rocm
def test_planted_without_the_launch_option_shim_the_check_fails(monkeypatch):
    monkeypatch.setattr(loader, "AMD_ONLY_LAUNCH_OPTIONS", ())  # the shim drops nothing
    seen = _run_both_ops_recording_launches(monkeypatch, launch=False)
    assert any("waves_per_eu" in kw for _, kw in seen)
    with pytest.raises(AssertionError, match="launch-option shim is missing"):
        _assert_cuda_accepts(seen)


def test_selecting_aiter_where_it_cannot_load_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(loader, "_MODE", [])
    monkeypatch.setenv(loader.AITER_PATH_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ParityError) as e:
        loader.setup()
    assert "\n" not in str(e.value) and loader.AITER_PATH_ENV in str(e.value) and "nowhere" in str(e.value)

"""pytest plugin: parity cases as tests of a kernel project (`pip install parity` registers it, entry point
`pytest11`).

    from parity.testing import assert_parity

    def test_tiny():
        assert_parity("tiny")                       # the built-in case; or a case TOML path, or a Case

    @pytest.mark.gpu                                # skipped cleanly where CUDA is absent
    def test_tiny_cuda(parity_checkpoint):
        assert_parity("tiny", checkpoint=parity_checkpoint("tiny"), device="cuda")

`assert_parity` runs the case through the same code as `parity run` (`parity.run.run_case`) and fails with the
verdict's first divergence (layer, sub-module, site, phase, step, request, position) as the assertion message.
The kernels under test are chosen as for `parity run`: `PARITY_BACKEND` / `PARITY_OPS` in the environment, or
`ops=`. A negative control: `pytest --parity-plant BUG` (or `plant=`) plants a bug of the selftest library
(`parity/selftest/bugs.py`) into the optimized side, and every `assert_parity` must then fail.

Fixtures: `parity_case(name_or_path)` loads a case; `parity_checkpoint(case)` writes the case's synthetic
official-format checkpoint once per test session (a session-scoped cache) and returns its path; `parity_plant`
is the `--parity-plant` value. Marker: `gpu`.

Heavy imports (torch, the models) happen inside the functions: pytest loads this plugin in every session of an
environment where parity is installed, before a project's conftest can set up its environment (Triton's
interpreter must be chosen before triton is first imported).
"""

import os
import tempfile
from pathlib import Path

import pytest

_state = {"plant": None, "checkpoints": {}}  # the --parity-plant option; case key -> synthetic checkpoint


def _load(case):
    from parity.cases import Case, load_case

    return case if isinstance(case, Case) else load_case(str(case))


def _case_key(case) -> tuple:
    return (case.source, case.name, case.preset, case.seed, case.init, case.overrides)


def synthetic_checkpoint(case, root: Path | None = None) -> Path:
    """The case's synthetic checkpoint, written once per process (under `root`, else a temporary dir)."""
    from parity.run import prepare_checkpoint

    case = _load(case)
    key = _case_key(case)
    cached = _state["checkpoints"].get(key)
    if cached is None or not cached.exists():
        where = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="parity-ckpt-"))
        cached = prepare_checkpoint(case, None, where / f"{case.name}-{len(_state['checkpoints'])}")
        _state["checkpoints"][key] = cached
    return cached


def assert_parity(
    case,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str = "cpu",
    plant: str | None = None,
    ops=None,
    noise=None,
    repro_dir: str | os.PathLike | None = None,
):
    """Run `case` (a built-in name, a case TOML path or a `Case`) as `parity run` does; raise AssertionError
    naming the first divergence when the verdict fails. Returns the `RunReport` of a passing run.

    Args:
        checkpoint: an official-format checkpoint dir (its config must be the case's model); default: the case's
            synthetic checkpoint, written once per process.
        device: `cpu` or `cuda[:N]`; a CUDA device on a machine without one skips the test.
        plant: a selftest bug planted into the optimized side (default: `--parity-plant`, if given).
        ops: an `OpsConfig` (default: `PARITY_BACKEND` / `PARITY_OPS`).
        noise: a `NoiseModel` (default: the case's).
        repro_dir: on failure, also write kernel repros of the failing op there (`parity repro DIR` runs them).
    """
    __tracebackhide__ = True  # pytest shows the caller's line and the message, not this function's body
    import torch

    from parity.run import run_case

    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"assert_parity(device={device!r}): this machine has no CUDA device")
    case = _load(case)
    plant = plant if plant is not None else _state["plant"]
    ckpt = Path(checkpoint) if checkpoint is not None else synthetic_checkpoint(case)
    report = run_case(case, ckpt, device, ops=ops, noise=noise, plant=plant)
    if not report.passed:
        message = f"parity case {case.name!r}: {report.location or 'the verdict failed'}"
        if plant:
            message += f" (planted bug {plant!r})"
        if repro_dir is not None:
            from parity.repro import write_kernel_repros

            paths = write_kernel_repros(report, Path(repro_dir), case=case)
            if paths:
                message += f"; kernel repros: {', '.join(str(p) for p in paths)}"
        raise AssertionError(message)
    return report


# --- pytest hooks and fixtures --------------------------------------------------------------------------------------


def pytest_addoption(parser):
    group = parser.getgroup("parity")
    group.addoption(
        "--parity-plant",
        default=None,
        metavar="BUG",
        help="plant this selftest bug (parity/selftest/bugs.py) into every assert_parity run: a negative control",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped where there is none)")
    _state["plant"] = config.getoption("--parity-plant")


def pytest_collection_modifyitems(config, items):
    gpu = [item for item in items if "gpu" in item.keywords]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture
def parity_case():
    """`parity_case(name_or_path) -> Case`: a built-in case or a case TOML, checked as `parity run` checks it."""
    return _load


@pytest.fixture(scope="session")
def parity_checkpoint(tmp_path_factory):
    """`parity_checkpoint(case) -> Path`: the case's synthetic official-format checkpoint, once per session."""
    root = tmp_path_factory.mktemp("parity-checkpoints")
    return lambda case: synthetic_checkpoint(case, root)


@pytest.fixture
def parity_plant() -> str | None:
    """The `--parity-plant` bug, or None."""
    return _state["plant"]

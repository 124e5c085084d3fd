"""Shared fixtures: a tiny V4 config and one synthetic official-format checkpoint per test session; `gpu` tests
skip with a reason where CUDA is absent."""

import os

import pytest
import torch

# without a GPU, Triton kernels run in its CPU interpreter, which must be chosen before triton is first imported
# (parity/optimized/ops/triton/runtime.py says why)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from parity import machine  # noqa: E402
from parity.checkpoint import build_model, write_checkpoint  # noqa: E402
from parity.config import ModelArgs  # noqa: E402

# the tests run many tiny ops: one thread avoids OpenMP oversubscription stalls on a loaded 2-core CI box;
# PARITY_TEST_THREADS=2 runs them with two (the audit of thread-count-dependent assertions, issue 7)
torch.set_num_threads(int(os.environ.get("PARITY_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    return ModelArgs.tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_args):
    return write_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), tiny_args, seed=0)


@pytest.fixture
def make_model(tiny_ckpt):
    """Build a fresh reference model (own caches and state) from the session checkpoint."""

    def make(**overrides):
        model, _ = build_model(tiny_ckpt, overrides=overrides)
        return model

    return make


@pytest.fixture
def tokens(tiny_args):
    return torch.randint(0, tiny_args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(7))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session):
    # printed even under -q: a red run names the CPU and torch dispatch level it ran with
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"machine: {machine.summary()}")

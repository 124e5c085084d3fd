"""Shared fixtures: a tiny V4 config and one synthetic official-format checkpoint per test session."""

import pytest
import torch

from parity.checkpoint import build_model, write_checkpoint
from parity.config import ModelArgs

# the tests run many tiny ops: one thread avoids OpenMP oversubscription stalls on a loaded 2-core CI box
torch.set_num_threads(1)


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
        model, _ = build_model(tiny_ckpt, **overrides)
        return model

    return make


@pytest.fixture
def tokens(tiny_args):
    return torch.randint(0, tiny_args.vocab_size, (2, 300), generator=torch.Generator().manual_seed(7))

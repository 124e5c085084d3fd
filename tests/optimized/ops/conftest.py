"""Fixtures of the per-op tests (`test_<op>.py`, one per module of `parity.optimized.ops.registry.OP_MODULES`).

Every op test compares the torch backend over a flat ragged batch `[T, ...]` with the op's reference twin run per
sequence at the reference's own shapes, bitwise (`torch.equal`).
"""

import pytest
import torch

from parity.checkpoint import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="module")
def ref_model(tiny_ckpt):
    """The reference Transformer on the session's synthetic tiny checkpoint (what `make_model()` builds), once per
    module: the op tests only read its parameters and never run or mutate it."""
    model, _ = build_model(tiny_ckpt)
    return model

"""Fixtures for the compare tests: small dumps written through the real writer."""

import pytest
import torch

from parity import dump
from parity.dump.tags import Tags
from parity.dump.writer import DumpWriter, Site


@pytest.fixture
def write_dump():
    """`write_dump(dir, {name: tensor}, phase=..., step=..., rank=0, world_size=1, **tags)` -> dir.

    Each name `module:field` becomes one record, written by `DumpWriter` exactly as the hooks write it.
    """

    def write(
        path, tensors: dict[str, torch.Tensor], *, rank=0, world_size=1, mode="full", phase="prefill", step=0, **tags
    ):
        writer = DumpWriter(path, mode, rank, world_size)
        for name, t in tensors.items():
            module, field = name.split(":")
            layer, block = dump.layer_of(module, dump.DumpConfig().layer_pattern)
            site = Site(module, "Mod", layer, block)
            writer.write_activation(site, Tags(phase, step, **tags), 0, 0, "output", {field: t})
        return writer.dir.parent if world_size > 1 else writer.dir

    return write

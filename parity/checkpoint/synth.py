"""Deterministic synthetic weights in the official on-disk formats.

Each parameter is drawn from its own generator, seeded from (seed, parameter name), so any subset (one layer, one
shard) can be produced alone and always comes out the same. Values are sized so a random model keeps finite,
non-degenerate activations through every layer: linear weights ~ N(0, 1/in), norm weights ~ 1 + N(0, 0.1^2),
mHC mixers ~ N(0, 1/(hc*D)). Quantized weights are drawn in fp32 and then quantized exactly like the official
checkpoints: FP8 e4m3 with a power-of-two ue8m0 scale per 128x128 block, FP4 e2m1 packed two per byte (low nibble
first) with a ue8m0 scale per 32 inputs.
"""

import zlib
from collections.abc import Iterator

import torch

from parity.checkpoint.layout import DiskTensor, disk_tensors_for_param, model_param_specs
from parity.config import ModelArgs
from parity.formats import quantize_fp4_groups, quantize_fp8_blocks


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def _master_value(name: str, shape: tuple[int, ...], args: ModelArgs, g: torch.Generator) -> torch.Tensor:
    """fp32 values of a parameter before it is stored in its disk format."""

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("norm.weight"):
        return 1.0 + normal(0.1)
    if name == "embed.weight":
        return normal(1.0)
    if leaf.startswith("hc_") and leaf.endswith("_fn"):
        return normal((shape[-1]) ** -0.5)
    if leaf.startswith("hc_") and leaf.endswith("_base"):
        return normal(0.1)
    if leaf.startswith("hc_") and leaf.endswith("_scale"):
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    if leaf == "attn_sink":
        return normal(1.0)
    if leaf == "ape":
        return normal(0.1)
    if leaf == "bias":
        return normal(0.1)
    if leaf == "tid2eid":
        rows = [torch.randperm(args.n_routed_experts, generator=g)[: shape[1]] for _ in range(shape[0])]
        return torch.stack(rows)
    # every linear weight, logical [out, in]
    return normal(shape[-1] ** -0.5)


def synth_param(name: str, shape: tuple[int, ...], dtype: torch.dtype, args: ModelArgs, seed: int):
    """Disk tensors ({disk name: tensor}) of one model parameter, drawn deterministically."""
    disk = disk_tensors_for_param(name, shape, dtype)
    if not disk:
        return {}
    g = _generator(seed, name)
    weight = disk[0]
    if weight.dtype == torch.int8:  # packed FP4 expert weight: logical [out, 2 * packed]
        logical = (shape[0], shape[1] * 2)
        packed, scale = quantize_fp4_groups(_master_value(name, logical, args, g))
        return {name: packed, name[: -len("weight")] + "scale": scale}
    if weight.dtype == torch.float8_e4m3fn and name.endswith(".weight"):
        q, scale = quantize_fp8_blocks(_master_value(name, shape, args, g))
        return {name: q, name[: -len("weight")] + "scale": scale}
    if name.endswith(".scale"):
        # the FP8/FP4 scales are produced together with their weights
        return {}
    value = _master_value(name, shape, args, g)
    return {weight.name: value.to(weight.dtype)}


def synth_tensors(args: ModelArgs, seed: int = 0, only: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(disk name, tensor) for every tensor of the checkpoint (or the params named in `only`), in layout order."""
    for name, (shape, dtype) in model_param_specs(args).items():
        if only is not None and name not in only:
            continue
        yield from synth_param(name, shape, dtype, args, seed).items()


def expected_disk_tensors(args: ModelArgs) -> dict[str, DiskTensor]:
    """name -> DiskTensor for the whole layout (what a reader checks a checkpoint against)."""
    specs = {}
    for name, (shape, dtype) in model_param_specs(args).items():
        for t in disk_tensors_for_param(name, shape, dtype):
            specs[t.name] = t
    return specs

"""Disk format -> reference-model parameter, as the official convert.py (model parallel 1) plus load_state_dict do.

- `attn.wo_a`: FP8 weight times its per-128x128 scale, computed in fp32 and cast to bf16 (exact: e4m3 x 2^k fits
  bf16); the scale is dropped.
- FP4 experts: the int8 bytes are reinterpreted as `float4_e2m1fn_x2` (no value changes).
- `tid2eid`: int64 -> int32. bf16 norms / head / compressor projections -> fp32 (exact).
"""

import torch

from parity.formats import dequantize_fp8_blocks


def dequantize_wo_a(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The official convert.py step for wo_a: exact FP8 -> bf16 with 128x128 block scales."""
    return dequantize_fp8_blocks(weight, scale).to(torch.bfloat16)


def to_model_param(name: str, disk: dict[str, torch.Tensor], target_dtype: torch.dtype) -> torch.Tensor:
    """Build model parameter `name` (of dtype `target_dtype`) from its disk tensors {disk name: tensor}."""
    weight = disk[name]
    if name.endswith("attn.wo_a.weight") and weight.dtype == torch.float8_e4m3fn:
        return dequantize_wo_a(weight, disk[name[: -len("weight")] + "scale"])
    if target_dtype == torch.float4_e2m1fn_x2:
        return weight.view(torch.float4_e2m1fn_x2)
    if weight.dtype != target_dtype:
        return weight.to(target_dtype)
    return weight

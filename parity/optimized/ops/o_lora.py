"""Grouped output LoRA (wo_a): per group g, o[T, g, :] . wo_a[g]^T in bf16.

Reference: parity.reference.model.Attention.forward, `einsum("bsgd,grd->bsgr")`, run on one request's tokens at a
time with the reference's `[1, s, g, d]` shape (cuBLAS picks its bf16 kernel by shape; on CPU rows are independent).
"""

import torch

from parity.optimized.ops.registry import Impl


def o_lora_torch(o: torch.Tensor, wo_a: torch.Tensor, n_groups: int, rank: int, segments: tuple[int, ...]):
    # o: [T, h*d] -> [T, g, rank]
    w = wo_a.view(n_groups, rank, -1)
    o = o.view(o.shape[0], n_groups, -1)
    parts = [torch.einsum("bsgd,grd->bsgr", o[a:b][None], w)[0] for a, b in zip(segments[:-1], segments[1:])]
    return torch.cat(parts)


IMPLS = {
    "torch": Impl(o_lora_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.o_lora:o_lora",
        bitwise=False,
        tolerance=(
            "the same bf16 x bf16 products as the einsum (the FP8 weight with its 128x128 block scales is "
            "dequantized in registers to exactly the bf16 wo_a; activations stay bf16), fp32 accumulation in "
            "another order: per element within the twin's distance to the float64 einsum plus K * 2^-23 of the "
            "terms' absolute sum plus 1 bf16 ulp"
        ),
    ),
    "aiter": Impl(
        "parity.optimized.ops.aiter.o_lora:o_lora",
        bitwise=False,
        tolerance=(
            "NOT the twin's math: ATOM PR #676's FP8 path quantizes activations per (token, 128-group) in the "
            "kernel and requantizes wo_a with ONE per-tensor scale (the scale collapse of its 128x128 block "
            "scales), two FP8 roundings the bf16 einsum does not have (about 2^-4 relative per product); the tests "
            "judge the kernel against those roundings replayed in float64 (aiter/o_lora.py reference_math, within "
            "an fp32 accumulation allowance plus 1 bf16 ulp) and measure, not hide, its distance to the twin"
        ),
    ),
}

"""RMSNorm over the last dim: fp32 math, `w * (x * rsqrt(mean(x^2) + eps))`, cast back to x's dtype.

Reference: parity.reference.model.rms_norm (RMSNorm.forward)

With `segments` the torch backend normalizes one request's rows at a time: CUDA's row reduction picks its
strategy from the number of rows, so a row's mean can differ in the last bit between a batch and the reference's
per-request call (measured on H100: 4 of 64 rows at width 256). On CPU the row reduction does not depend on it.
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import rms_norm


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, segments: tuple[int, ...] | None = None):
    # x: [T, ..., d]; segments: row groups over dim 0, or None for one call
    if segments is None or len(segments) == 2:
        return rms_norm(x, weight, eps)
    return torch.cat([rms_norm(x[a:b], weight, eps) for a, b in zip(segments[:-1], segments[1:])])


IMPLS = {
    "torch": Impl(rms_norm_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.rms_norm:rms_norm",
        bitwise=False,
        tolerance=(
            "float64 goldens: within the twin's own error + 1/2 ulp (bf16 output: both round values within ~1e-7 of "
            "the float64 math, so only a rounding midpoint can go the other way) / + 3 ulp (fp32 output: three fp32 "
            "roundings) of it. The twin's fp32 mean follows torch's reduction order and its rsqrt rounds twice (CPU) "
            "or is rsqrtf (CUDA); the kernel's r is the float64 value rounded once"
        ),
    ),
}

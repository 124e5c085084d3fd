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


IMPLS = {"torch": Impl(rms_norm_torch)}

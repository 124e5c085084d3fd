"""RMSNorm over the last dim: fp32 math, `w * (x * rsqrt(mean(x^2) + eps))`, cast back to x's dtype.

Reference: parity.reference.model.RMSNorm.forward
"""

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    var = x.square().mean(-1, keepdim=True)
    x = x * torch.rsqrt(var + eps)
    return (weight * x).to(dtype)


IMPLS = {"torch": rms_norm_torch}

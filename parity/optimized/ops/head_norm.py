"""Per-head unit RMS normalization of the queries, in bf16 tensor ops: q * rsqrt(mean(q^2) + eps).

Reference: parity.reference.model.Attention.forward (`q *= torch.rsqrt(q.square().mean(-1, keepdim=True) + eps)`).

The torch backend runs it per request: CPU kernels vectorize the leading elements of a tensor and finish the tail
with scalar code, and for bf16 rsqrt the two differ in the last bit (measured). The per-token tensor here has only
n_heads elements, so which tokens fall into the tail depends on the tensor's length; per request, the lengths are
the reference's.
"""

import torch

from parity.optimized.ops.registry import Impl


def head_norm_torch(q: torch.Tensor, eps: float, cu_seqlens: tuple[int, ...]) -> torch.Tensor:
    # q: [T, h, d] bf16, normalized in place
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        seg = q[a:b]
        seg *= torch.rsqrt(seg.square().mean(-1, keepdim=True) + eps)
    return q


IMPLS = {
    "torch": Impl(head_norm_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.head_norm:head_norm",
        bitwise=False,
        tolerance=(
            "0 ulp beyond the twin's own distance from the float64-exact model of its five bf16 rounding steps: the "
            "kernel keeps every bf16 step, sums the squares exactly and takes the device's fp32 rsqrt as torch "
            "does; the twin's fp32 sum order and, on CPU, its scalar-tail rsqrt (sqrt rounded to bf16 first) move "
            "a bf16 step in rare heads, so it cannot be matched bit for bit"
        ),
    ),
}

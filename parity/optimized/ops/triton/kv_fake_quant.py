"""Triton `kv_fake_quant`: in-place FP8 e4m3 fake-quant of the KV non-rope dims per 64-group with ue8m0 scales.

Reference: parity.reference.kernels.act_quant (inplace=True, block 64; spec §3.2, §5.4 step 3, §6.5 step 4), and
with `fp8=False` parity.reference.kernels.act_quant_initial (the initial official revision, whose in-place cast to
bf16 makes it an identity in practice).

The kernel is act_quant's (`triton/act_quant.py`, one `[rows, groups, 64]` tile per program): per group the exact
amax, the fp32-literal floor and reciprocal multiply, the power-of-two scale from the IEEE bits, x * 2^-e, clamp,
RNE to e4m3 (or to bf16 for the initial revision), times s, RNE to bf16, stored back through the view's row
stride (the op receives `kv[..., :-rope_dim]`, a strided view, and must write the KV itself). Every step is exact or
one IEEE rounding: bit for bit the twin (`bitwise=True`). A view whose leading dims do not collapse to one row
stride is quantized as a contiguous copy and copied back.

Unverified without a GPU: the sm_90 fp32 -> e4m3 cast (see act_quant); the CUDA tests check it.
"""

import torch

from parity.optimized.ops.triton.act_quant import FAKE_BF16, FAKE_E4M3, fake_quant_fp8


def kv_fake_quant(x: torch.Tensor, block: int, scale_fmt, scale_dtype, fp8: bool = True) -> torch.Tensor:
    """The `KvFakeQuant` contract: in place on a bf16 view `[..., n]`; returns x."""
    return fake_quant_fp8(x, block, scale_fmt, scale_dtype, FAKE_E4M3 if fp8 else FAKE_BF16)


def kv_fake_quant_planted(x, block, scale_fmt, scale_dtype, fp8=True, scale_shift=0):
    """kv_fake_quant with the tests' planted-bug hook (`scale_shift` added to every scale exponent)."""
    return fake_quant_fp8(x, block, scale_fmt, scale_dtype, FAKE_E4M3 if fp8 else FAKE_BF16, scale_shift)

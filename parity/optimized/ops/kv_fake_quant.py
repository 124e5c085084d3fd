"""In-place FP8 fake-quant of the KV non-rope dims (window KV and main compressor entries), groups of 64.

Reference: parity.reference.kernels.act_quant(x, 64, fmt, dtype, inplace=True); with `fp8=False` the initial
official revision's identity (kernels.act_quant_initial).
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference import kernels


def kv_fake_quant_torch(x: torch.Tensor, block: int, scale_fmt, scale_dtype, fp8: bool = True) -> torch.Tensor:
    quant = kernels.act_quant if fp8 else kernels.act_quant_initial
    return quant(x, block, scale_fmt, scale_dtype, True)


IMPLS = {
    "torch": Impl(kv_fake_quant_torch),
    # exact: act_quant's kernel in place (RNE to e4m3, or to bf16 for the initial revision, times a power of two)
    "triton": Impl("parity.optimized.ops.triton.kv_fake_quant:kv_fake_quant", bitwise=True),
}

"""FP8 activation quantization before a GEMM: per (token, 128-group) e4m3 with ue8m0 scales.

Reference: parity.reference.kernels.act_quant
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {
    "torch": Impl(kernels.act_quant),
    # exact: amax, power-of-two scale from the bits, x * 2^-e, RNE to e4m3 (spec §3.2)
    "triton": Impl("parity.optimized.ops.triton.act_quant:act_quant", bitwise=True),
}

"""FP8 activation x packed-FP4 weight GEMM with per-32 weight scales, bf16 out.

Reference: parity.reference.kernels.fp4_gemm
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {"torch": Impl(kernels.fp4_gemm)}

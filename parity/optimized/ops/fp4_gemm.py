"""FP8 activation x packed-FP4 weight GEMM with per-32 weight scales, bf16 out.

Reference: parity.reference.kernels.fp4_gemm
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {
    "torch": Impl(kernels.fp4_gemm),
    "triton": Impl(
        "parity.optimized.ops.triton.fp4_gemm:fp4_gemm",
        bitwise=False,
        tolerance=(
            "same 32-wide K blocks, (P * sa) * sb scaling and fp32 accumulation order as the twin (K > 8 blocks: "
            "summed in K-only chunks), the e2m1 weights decoded exactly, but each block product comes from the FP8 "
            "tensor cores (GPU) or an fp32 sum (interpreter) instead of the twin's exact sum: per element within "
            "the twin's distance to the float64 math plus 2^-12 (GPU) / 2^-17 (CPU) of the terms' absolute sum "
            "plus 1 bf16 ulp"
        ),
    ),
}

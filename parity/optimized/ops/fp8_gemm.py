"""FP8 x FP8 block-scaled GEMM, C[T, N] = A[T, K] . B[N, K]^T, bf16 out.

Reference: parity.reference.kernels.fp8_gemm (row-independent: each token's row is computed alone, so the result
does not depend on the batch it sits in)
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {
    "torch": Impl(kernels.fp8_gemm),
    "triton": Impl(
        "parity.optimized.ops.triton.fp8_gemm:fp8_gemm",
        bitwise=False,
        tolerance=(
            "same 128-wide K blocks, scales and fp32 accumulation order as the twin (K > 8 blocks: summed in K-only "
            "chunks), but each block product P_k comes from the FP8 tensor cores (GPU: about 14 accumulator bits; "
            "interpreter: an fp32 sum) instead of the twin's exact sum: per element within the twin's distance to "
            "the float64 math plus 2^-12 (GPU) / 2^-17 (CPU) of the terms' absolute sum plus 1 bf16 ulp"
        ),
    ),
    "aiter": Impl(
        "parity.optimized.ops.aiter.fp8_gemm:fp8_gemm",
        bitwise=False,
        tolerance=(
            "aiter's gemm_a8w8_blockscale has the twin's 128-wide K blocks and fp32 accumulation order (split-K "
            "pinned off), but P_k comes from the MMA (GPU) or numpy's fp32 sum (interpreter) instead of the exact "
            "sum, and it scales by sa then sb (equal to sa*sb for ue8m0 scales): per element within the twin's "
            "distance to the float64 block math plus the FP8 block allowance plus 1 bf16 ulp"
        ),
    ),
}

"""FP8 x FP8 block-scaled GEMM, C[T, N] = A[T, K] . B[N, K]^T, bf16 out.

Reference: parity.reference.kernels.fp8_gemm (row-independent: each token's row is computed alone, so the result
does not depend on the batch it sits in)
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {"torch": Impl(kernels.fp8_gemm)}

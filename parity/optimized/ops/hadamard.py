"""Hadamard rotation of the last dim (indexer q and entries) before FP4 fake-quant.

Reference: parity.reference.kernels.hadamard_transform
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {
    "torch": Impl(kernels.hadamard_transform),
    # exact: the same fp32 butterflies (lowest stride first), one fp32 scale multiply, one RNE (spec §3.7)
    "triton": Impl("parity.optimized.ops.triton.hadamard:hadamard", bitwise=True),
}

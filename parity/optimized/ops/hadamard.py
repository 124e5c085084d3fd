"""Hadamard rotation of the last dim (indexer q and entries) before FP4 fake-quant.

Reference: parity.reference.kernels.hadamard_transform
"""

from parity.optimized.ops.registry import Impl
from parity.reference import kernels

IMPLS = {"torch": Impl(kernels.hadamard_transform)}

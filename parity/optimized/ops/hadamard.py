"""Hadamard rotation of the last dim (indexer q and entries) before FP4 fake-quant.

Reference: parity.reference.kernels.hadamard_transform
"""

from parity.reference import kernels

IMPLS = {"torch": kernels.hadamard_transform}

"""In-place FP4 e2m1 fake-quant (indexer q and indexer entries), groups of 32.

Reference: parity.reference.kernels.fp4_act_quant(x, 32, inplace=True)
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference import kernels


def fp4_fake_quant_torch(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    return kernels.fp4_act_quant(x, block, True)


IMPLS = {
    "torch": Impl(fp4_fake_quant_torch),
    # exact: power-of-two scale from the bits, the e2m1 table with ties to the even code (spec §3.3)
    "triton": Impl("parity.optimized.ops.triton.fp4_fake_quant:fp4_fake_quant", bitwise=True),
}

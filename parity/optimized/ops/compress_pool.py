"""Compressor pooling: per channel, a softmax over the block's positions weights the kv rows, summed.

Reference: parity.reference.model.Compressor.forward, `(kv * score.softmax(dim)).sum(dim)` over the r (or 2r with
overlap) positions of a block, in fp32.
"""

import torch

from parity.optimized.ops.registry import Impl


def compress_pool_torch(kv: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    # kv, score: [..., w, d] fp32 (w positions of a block) -> [..., d]; the reference reduces the same dim of the
    # same layout ([b, n, w, d] in prefill, [b, w, d] in decode)
    return (kv * score.softmax(dim=-2)).sum(dim=-2)


IMPLS = {
    "torch": Impl(compress_pool_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.compress_pool:compress_pool",
        bitwise=False,
        tolerance="within 0.5 fp32 ulp of the exact pooling (float64 math, one rounding); torch's fp32 softmax/sum "
        "order is its own and differs between CPU and CUDA, so the twin's bits are not reproducible; never further "
        "from the float64 golden than the twin plus 1 fp32 ulp",
    ),
}

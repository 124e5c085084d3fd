"""Interleaved RoPE applied in place to a bf16 view, one rotation per token (per-token positions).

Reference: parity.reference.model.apply_rotary_emb (there the positions are start_pos .. start_pos+s-1)
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import apply_rotary_emb


def rope_torch(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    # x: [T, r] or [T, h, r] bf16 view; freqs_cis: [T, r/2] complex64 (the rows of each token's position).
    # The twin rotates a [1, s, ...] view by one table row per token: the flat tokens are that sequence
    apply_rotary_emb(x[None], freqs_cis, inverse)
    return x


IMPLS = {
    "torch": Impl(rope_torch),
    # the complex product rounded as the twin's device rounds it: FMAs on CUDA, separate products on CPU
    "triton": Impl("parity.optimized.ops.triton.rope:rope"),
}

"""Interleaved RoPE applied in place to a bf16 view, one rotation per token (per-token positions).

Reference: parity.reference.model.apply_rotary_emb (there the positions are start_pos .. start_pos+s-1)
"""

import torch

from parity.optimized.ops.registry import Impl


def rope_torch(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    # x: [T, r] or [T, h, r] bf16 view; freqs_cis: [T, r/2] complex64 (the rows of each token's position)
    y = x
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    if inverse:
        freqs_cis = freqs_cis.conj()
    if z.ndim == 3:
        freqs_cis = freqs_cis.unsqueeze(1)
    y.copy_(torch.view_as_real(z * freqs_cis).flatten(-2))
    return y


IMPLS = {
    "torch": Impl(rope_torch),
    # the complex product rounded as the twin's device rounds it: FMAs on CUDA, separate products on CPU
    "triton": Impl("parity.optimized.ops.triton.rope:rope"),
}

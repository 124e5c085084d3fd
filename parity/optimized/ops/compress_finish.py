"""A compressor's new entries from their pooled values: the cast to the activations' dtype, RMSNorm, RoPE on the last
rope dims (each entry at the position of its block's first token), then the Hadamard rotation and FP4 fake-quant
(the indexer's compressor) or the FP8 fake-quant of the non-rope dims (the attention's).

Reference: parity.reference.model.Compressor.forward after the pooling (`self.norm(kv.to(dtype))`,
`apply_rotary_emb`, `rotate_activation` + `kernels.fp4_act_quant` or `self.kv_quant`).
"""

import torch

from parity.optimized.ops.fp4_fake_quant import fp4_fake_quant_torch
from parity.optimized.ops.kv_fake_quant import kv_fake_quant_torch
from parity.optimized.ops.registry import Impl
from parity.optimized.ops.rms_norm import rms_norm_torch
from parity.optimized.ops.rope import rope_torch
from parity.reference import kernels
from parity.reference.model import FP4_BLOCK_SIZE, KV_QUANT_BLOCK


def compress_finish_torch(
    pooled: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    segments: tuple[int, ...],
    freqs_cis: torch.Tensor,
    positions: torch.Tensor,
    rotate: bool,
    scale_fmt,
    scale_dtype,
    fp8: bool,
) -> torch.Tensor:
    # pooled [M, d] fp32 -> entries [M, d] bf16; freqs_cis: the [S, rd/2] table, positions [M] each entry's row;
    # segments: the norm's row groups (a prefill's entries together, every later entry alone)
    rd = 2 * freqs_cis.shape[-1]
    entries = rms_norm_torch(pooled.to(torch.bfloat16), weight, eps, segments)
    rope_torch(entries[..., -rd:], freqs_cis[positions])
    if rotate:
        entries = kernels.hadamard_transform(entries, entries.size(-1) ** -0.5)
        return fp4_fake_quant_torch(entries, FP4_BLOCK_SIZE)
    kv_fake_quant_torch(entries[..., :-rd], KV_QUANT_BLOCK, scale_fmt, scale_dtype, fp8)
    return entries


IMPLS = {
    "torch": Impl(compress_finish_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.compress_finish:compress_finish",
        bitwise=False,
        tolerance=(
            "the Triton rms_norm, rope, hadamard and quantizer kernels' own arithmetic in one program per entry, bit "
            "for bit those kernels in sequence (tested): the norm's float64 sum of squares and rounding order, so "
            "per element within the twin's distance to the float64 math plus 1/2 bf16 ulp before the fake-quant, "
            "which then maps both onto its grid (a rounding midpoint can land one FP8 / FP4 step apart)"
        ),
    ),
}

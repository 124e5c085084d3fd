"""o_lora (wo_a) on aiter's `batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant`, the kernel
of ATOM PR #676 (aiter.ops.triton.batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant).

Reference: parity.reference.model.Attention.forward (`einsum("bsgd,grd->bsgr")` in bf16 on the bf16 wo_a that
convert.py dequantized exactly from the checkpoint's FP8 with 128x128 block scales, spec §5.6).

What the aiter path computes, per group g (batch index) and token t:
- the weight with ONE fp32 scale for the whole tensor (all groups): `per_tensor_fp8` (the scale collapse, below);
- the activations quantized in the kernel per (token, 128-wide K group): m = max|o| (at least 1e-10),
  a_s = fp32(m) * fl32(1/448), q = e4m3(clamp(o * (1 / a_s))) - scales that are not powers of two, unlike the
  model's act_quant;
- acc += fp32(q . wq over the group) * a_s over K groups, times the weight scale, bf16 out.
So it adds two FP8 roundings (activations and weights) that the reference's bf16 einsum does not have: this is a
precision loss by design, not a kernel error. `reference_math` replays these exact roundings in float64 (the
tests judge the kernel against it tightly), and the o_lora tests measure the loss against the reference.

The scale collapse (`per_tensor_fp8`): the checkpoint stores wo_a as e4m3 with one power-of-two scale per 128x128
block; this kernel takes one scale for the whole tensor, so the weight is requantized from the exact bf16 values
with the dynamic per-tensor recipe s = fl32(amax / 448), wq = e4m3(w / s) (RNE, saturating). Every block whose
values were not already e4m3 multiples of s is rounded again: the largest-amax block to about 2^-4 relative,
blocks with much smaller scales fall into e4m3's subnormals (absolute step s * 2^-9) or to zero. Done once per
weight tensor (`weight_cache`). ATOM's own requant helper was not read; this is the standard recipe the `(1,)`
scale interface implies. Unverified without ROCm: the kernel on MI300X/MI355X (MFMA; aiter picks
`float8_e4m3fnuz`, max 240, on gfx942, which halves the range and shifts every code), and the GPU's reciprocal
(`1 / a_s` in Triton is an approximate division on NVIDIA: an activation code may flip at a rounding tie).
"""

import torch

from parity.optimized.ops import weight_cache
from parity.optimized.ops.aiter import loader

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
GROUP = 128  # the activation quantization group along K (the kernel's BLOCK_SIZE_K)


def per_tensor_fp8(w: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 wo_a `[g*rank, K]` -> (e4m3 `[g, rank, K]`, fp32 scale `[1]`): one scale for the whole tensor."""
    wf = w.float()
    scale = (wf.abs().amax().clamp_min(1e-12) / FP8_MAX).reshape(1)  # fp32 division, rounded once
    q = (wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(n_groups, -1, w.shape[-1]).contiguous(), scale


def reference_math(o: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The aiter kernel's math with exact sums (float64): o bf16 `[T, g, K]`, wq `[g, rank, K]` -> fp32 `[T, g, rank]`
    before the bf16 rounding, accumulated per K group in fp32 like the kernel (tests only: slow, obvious)."""
    t, g, k = o.shape
    one_over_max = torch.tensor(1.0 / FP8_MAX, dtype=torch.float32, device=o.device)
    acc = torch.zeros(t, g, wq.shape[1], dtype=torch.float32, device=o.device)
    for k0 in range(0, k, GROUP):
        a = o[..., k0 : k0 + GROUP].float()
        m = a.abs().amax(-1, keepdim=True).clamp_min(1e-10)
        a_s = m * one_over_max
        q = (a * (1.0 / a_s)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        p = torch.einsum("tgk,grk->tgr", q.double(), wq[..., k0 : k0 + GROUP].double()).float()
        acc = acc + p * a_s
    return acc * w_scale.float()


def o_lora(o: torch.Tensor, wo_a: torch.Tensor, n_groups: int, rank: int, segments=None) -> torch.Tensor:
    """Grouped output LoRA: o bf16 `[T, h*d]`, wo_a bf16 `[g*rank, h*d/g]` -> bf16 `[T, g, rank]` (rows are
    independent: `segments` is accepted for the op contract and ignored)."""
    bmm = loader.load(
        "aiter.ops.triton.batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant",
        "batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant",
    )
    t, hd = o.shape
    kg = hd // n_groups
    assert wo_a.shape == (n_groups * rank, kg), f"o_lora/aiter: wo_a {tuple(wo_a.shape)} for {n_groups}x{rank}x{kg}"
    assert o.dtype == torch.bfloat16, o.dtype
    name = f"o_lora.per_tensor_fp8.g{n_groups}"
    wq, w_scale = weight_cache.converted(name, wo_a, lambda w: per_tensor_fp8(w, n_groups))
    out = torch.empty(t, n_groups, rank, dtype=torch.bfloat16, device=o.device)
    if t == 0:
        return out
    x = o.contiguous().view(t, n_groups, kg)  # [M, B, K]: the kernel's transpose_bm_in layout, no copy
    # YQ [M, B, N] = out itself (transpose_bm): the kernel writes our layout directly
    bmm(x, wq, w_scale, group_size=GROUP, dtype=torch.bfloat16, YQ=out, transpose_bm=True, transpose_bm_in=True)
    return out

"""fp8_gemm on aiter's `gemm_a8w8_blockscale` (aiter.ops.triton.gemm_a8w8_blockscale, Triton).

Reference: parity.reference.kernels.fp8_gemm (the official TileLang `fp8_gemm`, spec §3.4).

The aiter kernel has the official block structure: for each 128-wide K block in ascending order, P_k = A_k . B_k^T
(`tl.dot` on e4m3, fp32), then `acc += P_k * sa[m, k] * sb[n/128, k]`, bf16 at the end. Differences from the twin:
- it multiplies P_k by sa and then by sb (two fp32 roundings) where the official kernel forms sa * sb first; equal
  for power-of-two (ue8m0) scales, one fp32 rounding per block apart for plain fp32 scales;
- P_k comes from the MMA (GPU) or numpy's fp32 sum of the exact products (interpreter), not the twin's exact sum;
- split-K (`NUM_KSPLIT` > 1 in a tuning table) would regroup the fp32 sum; the MI300X tables that the loader maps
  to use 1, and the adapter pins `NUM_KSPLIT` = 1 so the order stays the twin's wherever the table says otherwise.

Layout adapters: aiter reads fp32 scales (Triton has no e8m0 type), so e8m0 scales are widened (exact: 2^(e-127))
- the weight's once per tensor (`weight_cache`), the activation's per call. The weight itself is passed as is
(e4m3 `[N, K]`, transposed by aiter as a view). Unverified without ROCm: the same kernel on MI300X/MI355X (MFMA
accumulation, `float8_e4m3fnuz` weights on gfx942), and aiter's CK/asm `gemm_a8w8_blockscale` that ATOM runs there.
"""

import torch

from parity.formats import e8m0_to_float
from parity.optimized.ops import weight_cache
from parity.optimized.ops.aiter import loader

_SCALE_BLOCK = 128


def fp32_scales(s: torch.Tensor) -> torch.Tensor:
    """Block scales as the fp32 aiter reads: e8m0 widened exactly, fp32 unchanged (contiguous)."""
    return (e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s.float()).contiguous()


def _config(m: int, n: int, k: int) -> dict:
    from aiter.ops.triton._triton_kernels.gemm_a8w8_blockscale import _get_config

    return {**_get_config(m, n, k), "NUM_KSPLIT": 1}  # a copy: aiter's wrapper writes into the dict it gets


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """e4m3 `[..., K]` (scales `[..., K/128]`) x e4m3 `[N, K]` (scales `[ceil(N/128), K/128]`) -> `[..., N]` in the
    default dtype (bf16 values), the official `fp8_gemm` contract."""
    gemm = loader.load("aiter.ops.triton.gemm_a8w8_blockscale", "gemm_a8w8_blockscale")
    assert a.dtype == torch.float8_e4m3fn and b.dtype == torch.float8_e4m3fn, (a.dtype, b.dtype)
    k = a.size(-1)
    n = b.shape[0]
    assert k % _SCALE_BLOCK == 0, f"fp8_gemm/aiter: K = {k} is not a multiple of {_SCALE_BLOCK}"
    assert b_s.shape == ((n + 127) // 128, k // 128), f"fp8_gemm/aiter: weight scales {tuple(b_s.shape)} for {n}x{k}"
    x = a.reshape(-1, k).contiguous()
    m = x.shape[0]
    if m == 0:
        out = torch.empty(0, n, dtype=torch.bfloat16, device=a.device)
    else:
        xs = fp32_scales(a_s.reshape(m, -1))
        ws = weight_cache.converted("fp8_gemm.scales", b_s, fp32_scales)
        out = gemm(x, b.contiguous(), xs, ws, dtype=torch.bfloat16, config=_config(m, n, k))
    return out.view(*a.shape[:-1], n).to(torch.get_default_dtype())

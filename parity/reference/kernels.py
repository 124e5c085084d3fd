"""Pure-torch twin of the official DeepSeek-V4 `inference/kernel.py` (TileLang) and of
`fast_hadamard_transform.hadamard_transform`: the reference's kernel seam.

Names, signatures and return conventions are the official ones, so this module is a drop-in `kernel` module for the
official `model.py` (spec Appendix C). Rounding follows each TileLang kernel's block structure (spec §3, §4.5, §8):

- `act_quant`, `fp4_act_quant`, `hadamard_transform`: bit-exact with the official kernels.
- `fp8_gemm` / `fp4_gemm`: per-K-block partial products, scaled and accumulated in fp32 in ascending K order, bf16
  at the end. A block's partial product is computed exactly (float64: every e4m3 x e4m3 product and every sum of up
  to 128 of them fits 53 bits) and rounded once to fp32. Hopper's tensor cores keep fewer accumulator bits in an
  undocumented order, so the official result can differ in rare last bf16 bits; this emulation is the exact-sum
  limit of that block structure, and it is the same on every device.
- `sparse_attn`: 64-slot blocks in top-k order, running max, fp32 exp, bf16-rounded P for the value product, fp32
  denominator updated as fma(l, alpha, sum), sink added last. Each MMA (q.k over d, P.V over a block) is taken as an
  exact accumulation rounded once to fp32; that is where the hardware's own order is unknowable.
- `hc_split_sinkhorn`: `m*scale + base` as an fma (nvcc contracts it), row/column sums of 4 rounded once.

Transcendentals (`exp`) are evaluated in float64 and rounded to fp32: correctly rounded, so CPU and CUDA agree;
CUDA's `expf` is within 2 ulp of that. The official wrapper pads attention heads to 16; heads are independent
here, so padding cannot change a value and is skipped.
"""

import torch

from parity.formats import (
    FP4_MAX,
    FP8_MAX,
    e2m1_codes,
    e8m0_to_float,
    fp4_to_float,
    pack_fp4,
    pow2_ceil,
    round_to_e2m1,
)

_F32 = torch.float32
# bound on the float64 temporaries of one GEMM chunk (elements)
_GEMM_CHUNK_ELEMS = 1 << 25


def _f32(v: float, device) -> torch.Tensor:
    """A Python float as the fp32 literal a TileLang kernel would bake in."""
    return torch.tensor(v, dtype=_F32, device=device)


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).to(_F32)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # a*b is exact in float64 for fp32 operands; the sum is rounded to float64 then fp32 (a double rounding that
    # differs from a true fma only when the float64 sum lands exactly on an fp32 rounding midpoint)
    return (a.double() * b.double() + c.double()).to(_F32)


def _sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """fp32 sum rounded once (via float64): independent of the reduction order."""
    return x.double().sum(dim, keepdim=keepdim).to(_F32)


def _group_scales(xf: torch.Tensor, floor: float, max_inv: float, round_scale: bool) -> torch.Tensor:
    # xf: [..., groups, block] fp32 -> s: [..., groups, 1] fp32
    amax = torch.maximum(xf.abs().amax(dim=-1, keepdim=True), _f32(floor, xf.device))
    v = amax * _f32(max_inv, xf.device)
    return pow2_ceil(v) if round_scale else v


def _act_quant_impl(x, block_size, scale_fmt, scale_dtype, inplace, inner_dtype):
    n = x.size(-1)
    assert n % block_size == 0, f"act_quant: last dim {n} is not a multiple of block_size {block_size}"
    if scale_fmt is None and scale_dtype == torch.float8_e8m0fnu:
        raise ValueError("act_quant: e8m0 scales need scale_fmt='ue8m0' (the official model never mixes them)")
    xf = x.float().unflatten(-1, (-1, block_size))  # [..., n/block, block]
    s = _group_scales(xf, 1e-4, 1.0 / FP8_MAX, scale_fmt is not None)
    y = (xf / s).clamp(-FP8_MAX, FP8_MAX)
    if inplace:
        y = (y.to(inner_dtype).to(_F32) * s).to(x.dtype).flatten(-2)
        x.copy_(y)
        return x
    return y.to(torch.float8_e4m3fn).flatten(-2), s.squeeze(-1).to(scale_dtype)


def act_quant(
    x: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
    inplace: bool = False,
):
    """Block-wise FP8 e4m3 quantization of the last dim (official `act_quant`, current revision).

    Args:
        x (torch.Tensor): bf16 `[..., N]`, N % block_size == 0; any strides.
        scale_fmt (str, Optional): "ue8m0" rounds each scale up to a power of two (from the IEEE bits).
        inplace (bool): fake-quant: x is overwritten with bf16(e4m3(x/s) * s) and returned.

    Returns:
        `(y, s)`: y e4m3 `[..., N]`, s `[..., N/block_size]` in `scale_dtype`; or x itself when inplace.
    """
    return _act_quant_impl(x, block_size, scale_fmt, scale_dtype, inplace, torch.float8_e4m3fn)


def act_quant_initial(
    x: torch.Tensor,
    block_size: int = 128,
    scale_fmt: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
    inplace: bool = False,
):
    """`act_quant` of the initial official revision: the in-place path casts x/s to bf16 instead of e4m3, which
    makes the KV fake-quant an identity (spec §3.2). The non-inplace path is the same as `act_quant`."""
    return _act_quant_impl(x, block_size, scale_fmt, scale_dtype, inplace, torch.bfloat16)


def fp4_act_quant(x: torch.Tensor, block_size: int = 32, inplace: bool = False):
    """Block-wise FP4 e2m1 quantization of the last dim with ue8m0 scales (official `fp4_act_quant`).

    Returns:
        `(y, s)`: y `float4_e2m1fn_x2` `[..., N/2]` (low nibble first), s e8m0 `[..., N/block_size]`; or x
        itself after x <- bf16(e2m1(x/s) * s) when inplace.
    """
    n = x.size(-1)
    assert n % block_size == 0, f"fp4_act_quant: last dim {n} is not a multiple of block_size {block_size}"
    xf = x.float().unflatten(-1, (-1, block_size))
    s = _group_scales(xf, FP4_MAX * 2.0**-126, 1.0 / FP4_MAX, True)
    y = round_to_e2m1((xf / s).clamp(-FP4_MAX, FP4_MAX))
    if inplace:
        x.copy_((y * s).to(x.dtype).flatten(-2))
        return x
    packed = pack_fp4(e2m1_codes(y.flatten(-2)))
    return packed.view(torch.float4_e2m1fn_x2), s.squeeze(-1).to(torch.float8_e8m0fnu)


def _gemm_operands(a, a_s, b, b_s):
    """Check the official wrapper's asserts; return (M, K, N, A as fp32 [M, K], activation scales fp32 [M, K/128])."""
    assert a.is_contiguous() and b.is_contiguous(), "Input tensors must be contiguous"
    assert a_s.is_contiguous() and b_s.is_contiguous(), "Scaling factor tensors must be contiguous"
    k = a.size(-1)
    m = a.numel() // k
    return m, k, b.size(0), a.view(m, k).float(), _scale_as_float(a_s).view(m, -1)


def _scale_as_float(s: torch.Tensor) -> torch.Tensor:
    return e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s.float()


def _blocked_gemm(a: torch.Tensor, b: torch.Tensor, block_k: int, scale) -> torch.Tensor:
    """C[M, N] = sum over K-blocks k (ascending) of fl32(A_k . B_k^T) scaled by `scale(p, k)`, in fp32.

    a: [M, K] fp32 (exact e4m3 values), b: [N, K] fp32 (exact e4m3 / e2m1 values).
    """
    m, k = a.shape
    n = b.shape[0]
    n_blocks = k // block_k
    acc = torch.zeros(m, n, dtype=_F32, device=a.device)
    a_blocks = a.view(m, n_blocks, block_k).transpose(0, 1)  # [kb, M, bk]
    b_blocks = b.view(n, n_blocks, block_k).permute(1, 2, 0)  # [kb, bk, N]
    step = max(1, _GEMM_CHUNK_ELEMS // max(1, m * n))
    for k0 in range(0, n_blocks, step):
        # float64 products of e4m3 (or e2m1) values are exact, and so is their sum over one block
        p = torch.bmm(a_blocks[k0 : k0 + step].double(), b_blocks[k0 : k0 + step].double()).to(_F32)
        for j in range(p.shape[0]):
            acc += scale(p[j], k0 + j)
    return acc


def _gemm_output(acc: torch.Tensor, lead_shape) -> torch.Tensor:
    # the TileLang kernels store bf16; the wrapper allocates the output in the default dtype
    return acc.to(torch.bfloat16).to(torch.get_default_dtype()).view(*lead_shape, acc.shape[-1])


def fp8_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C[M, N] = A[M, K] . B[N, K]^T with per-128 FP8 block scales on both sides (official `fp8_gemm`).

    Args:
        a (torch.Tensor): e4m3 `[..., K]`; a_s: `[..., K/128]` per (row, 128-group) scales.
        b (torch.Tensor): e4m3 `[N, K]`; b_s: `[ceil(N/128), K/128]` per 128x128 block scales.

    Returns:
        `[..., N]` in the default dtype (bf16 values).
    """
    m, k, n, a32, sa = _gemm_operands(a, a_s, b, b_s)  # sa: [M, K/128]
    sb = _scale_as_float(b_s).repeat_interleave(128, dim=0)[:n]  # [N, K/128]

    def scale(p, kb):
        # the kernel forms sa*sb first (Scale_C), then C += P * Scale_C
        return p * (sa[:, kb, None] * sb[None, :, kb])

    acc = _blocked_gemm(a32, b.float(), 128, scale)
    return _gemm_output(acc, a.shape[:-1])


def fp4_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C[M, N] = A_fp8[M, K] . B_fp4[N, K]^T (official `fp4_gemm`): 32-wide K blocks, C += (P * sa) * sb.

    Args:
        a (torch.Tensor): e4m3 `[..., K]`; a_s: `[..., K/128]` activation scales.
        b (torch.Tensor): `float4_e2m1fn_x2` (or int8 bytes) `[N, K/2]`, low nibble first; b_s: e8m0 `[N, K/32]`.
    """
    m, k, n, a32, sa = _gemm_operands(a, a_s, b, b_s)  # sa: [M, K/128]
    sb = _scale_as_float(b_s)  # [N, K/32]
    w = fp4_to_float(b.view(torch.uint8)).view(n, k)  # e2m1 values are exact in e4m3 and fp32

    def scale(p, kb):
        return p * sa[:, kb // 4, None] * sb[None, :, kb]

    acc = _blocked_gemm(a32, w, 32, scale)
    return _gemm_output(acc, a.shape[:-1])


SPARSE_ATTN_BLOCK = 64


def sparse_attn(
    q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor, softmax_scale: float
) -> torch.Tensor:
    """Sparse MQA over gathered KV slots with a per-head sink (official `sparse_attn`, spec §8).

    Args:
        q (torch.Tensor): bf16 `[b, m, h, d]`.
        kv (torch.Tensor): bf16 `[b, n, d]`, both key and value.
        attn_sink (torch.Tensor): fp32 `[h]`, a logit with no value vector, not multiplied by the scale.
        topk_idxs (torch.Tensor): int32 `[b, m, k]` slot indices into kv, -1 = none.

    Returns:
        bf16 `[b, m, h, d]`.
    """
    b, m, h, d = q.shape
    k = topk_idxs.size(-1)
    dev = q.device
    scale = _f32(softmax_scale, dev)
    neg_inf = _f32(float("-inf"), dev)
    row_max = torch.full((b, m, h), float("-inf"), dtype=_F32, device=dev)
    denom = torch.zeros(b, m, h, dtype=_F32, device=dev)
    acc = torch.zeros(b, m, h, d, dtype=_F32, device=dev)
    q64 = q.double()
    batch = torch.arange(b, device=dev)[:, None, None]
    for t0 in range(0, k, SPARSE_ATTN_BLOCK):
        idx = topk_idxs[:, :, t0 : t0 + SPARSE_ATTN_BLOCK].long()  # [b, m, w]
        valid = idx != -1
        kv_blk = kv[batch, idx.clamp(min=0)]  # [b, m, w, d]
        kv64 = torch.where(valid[..., None], kv_blk.double(), 0.0)  # a -1 slot reads zeros, never memory
        s = torch.einsum("bmhd,bmwd->bmhw", q64, kv64).to(_F32)
        s = torch.where(valid[:, :, None, :], s, neg_inf) * scale
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        alpha = _exp(row_max - new_max)
        p = _exp(s - new_max[..., None])  # [b, m, h, w]
        denom = _fma(denom, alpha, _sum(p, -1))
        pv = torch.einsum("bmhw,bmwd->bmhd", p.to(torch.bfloat16).double(), kv64)
        acc = ((acc * alpha[..., None]).double() + pv).to(_F32)
        row_max = new_max
    denom = denom + _exp(attn_sink.float() - row_max)
    return (acc / denom[..., None]).to(q.dtype)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    # TVM legalizes T.sigmoid to 1 / (1 + exp(-x))
    return 1.0 / (1.0 + _exp(-x))


def hc_split_sinkhorn(
    mixes: torch.Tensor,
    hc_scale: torch.Tensor,
    hc_base: torch.Tensor,
    hc_mult: int = 4,
    sinkhorn_iters: int = 20,
    eps: float = 1e-6,
):
    """Split the mHC mixes into pre/post weights and a Sinkhorn-normalized comb matrix (official kernel, §4.5).

    Args:
        mixes (torch.Tensor): fp32 `[b, s, (2+hc)*hc]`: [0:hc] pre, [hc:2hc] post, [2hc:] comb row-major (j, k).
        hc_scale (torch.Tensor): fp32 `[3]`; hc_base: fp32 `[(2+hc)*hc]`.

    Returns:
        `(pre [b, s, hc], post [b, s, hc], comb [b, s, hc, hc])`, all fp32.
    """
    hc = hc_mult
    dev = mixes.device
    e = _f32(eps, dev)
    m = mixes.float()
    base = hc_base.float()
    sc = hc_scale.float()
    pre = _sigmoid(_fma(m[..., :hc], sc[0], base[:hc])) + e
    post = 2.0 * _sigmoid(_fma(m[..., hc : 2 * hc], sc[1], base[hc : 2 * hc]))
    comb = _fma(m[..., 2 * hc :], sc[2], base[2 * hc :]).unflatten(-1, (hc, hc))  # [b, s, j, k]
    comb = _exp(comb - comb.amax(dim=-1, keepdim=True))
    comb = comb / _sum(comb, -1, keepdim=True) + e
    comb = comb / (_sum(comb, -2, keepdim=True) + e)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (_sum(comb, -1, keepdim=True) + e)
        comb = comb / (_sum(comb, -2, keepdim=True) + e)
    return pre, post, comb


def hadamard_transform(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sylvester-order Walsh-Hadamard transform of the last dim times `scale`, in x's dtype
    (`fast_hadamard_transform.hadamard_transform`): fp32 butterflies with the lowest stride first, then one
    multiply by the fp32 scale and one rounding to x's dtype (spec §3.7)."""
    d = x.size(-1)
    if d & (d - 1):
        raise ValueError(f"hadamard_transform: last dim {d} is not a power of two")
    y = x.float()
    stride = 1
    while stride < d:
        y = y.reshape(*x.shape[:-1], d // (2 * stride), 2, stride)
        lo, hi = y[..., 0, :], y[..., 1, :]
        y = torch.stack([lo + hi, lo - hi], dim=-2)
        stride *= 2
    return (y.reshape(x.shape) * _f32(scale, x.device)).to(x.dtype)

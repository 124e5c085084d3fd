"""The golden: the reference model with its kernels computed in float64, the truth both sides are measured from.

`golden_kernels()` swaps the kernels of the reference's seam (`parity.reference.kernels`) for versions that keep
the same inputs, quantization points and output dtypes but do their arithmetic in float64 and round once at the
end: the GEMMs sum exact products of the same FP8/FP4 values and scales in one float64 pass instead of fp32 block
partial sums; sparse attention takes a float64 softmax with the sink and no bf16-rounded probabilities; the mHC
Sinkhorn, the Hadamard rotation run in float64. The plain-torch stages of the model (norms, the fp32 mixers and
gates, compressor pooling, RoPE) are the reference's own fp32 math: "fp64 or fp32", as the verdict issue allows.

With `quantize_activations=False` the activation quantizers become the identity (GEMM inputs stay bf16 with unit
scales, the KV and indexer fake-quants do nothing): the model's math without its activation-quantization noise.
The default keeps them, so the golden and the reference quantize the same values the same way.

Why it exists: a legitimate kernel rounds differently from the reference but is no further from the truth than the
reference is; a bug is. `parity.compare.verdict` measures both sides' distance to this golden. The swap patches the
seam module for the duration of the `with` block (build the golden model inside it: modules bind the KV quantizer
at construction); it is not thread-safe, and nothing else should run models meanwhile.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from parity.formats import e8m0_to_float, fp4_to_float
from parity.reference import kernels

_F64 = torch.float64


def _scales(s: torch.Tensor) -> torch.Tensor:
    return (e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s.float()).to(_F64)


def _act(a: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
    """[..., K] activations times their per-128 scales, float64 [M, K]."""
    k = a.size(-1)
    a64 = a.float().to(_F64).reshape(-1, k)
    s = _scales(a_s).reshape(a64.shape[0], -1)
    return a64 * s.repeat_interleave(k // s.shape[-1], dim=1)


def _out(c: torch.Tensor, lead) -> torch.Tensor:
    return c.to(torch.bfloat16).to(torch.get_default_dtype()).view(*lead, c.shape[-1])


def fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    n, k = b.shape
    w = b.float().to(_F64) * _scales(b_s).repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return _out(_act(a, a_s) @ w.T, a.shape[:-1])


def fp4_gemm(a, a_s, b, b_s, scale_dtype=torch.float32):
    n = b.shape[0]
    w = fp4_to_float(b.view(torch.uint8)).view(n, -1).to(_F64)
    w = w * _scales(b_s).repeat_interleave(w.shape[1] // b_s.shape[1], dim=1)
    return _out(_act(a, a_s) @ w.T, a.shape[:-1])


def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
    # q: [b, m, h, d], kv: [b, n, d], topk_idxs: [b, m, k] (-1 none) -> [b, m, h, d] in q's dtype
    b = q.shape[0]
    idx = topk_idxs.long()
    valid = idx >= 0
    batch = torch.arange(b, device=q.device)[:, None, None]
    kv64 = torch.where(valid[..., None], kv[batch, idx.clamp(min=0)].to(_F64), 0.0)  # [b, m, k, d]
    s = torch.einsum("bmhd,bmkd->bmhk", q.to(_F64), kv64) * softmax_scale
    s = torch.where(valid[:, :, None, :], s, float("-inf"))
    sink = attn_sink.to(_F64)[None, None, :, None]
    top = torch.maximum(s.amax(-1, keepdim=True), sink)
    p = torch.exp(s - top)
    denom = p.sum(-1, keepdim=True) + torch.exp(sink - top)
    return (torch.einsum("bmhk,bmkd->bmhd", p, kv64) / denom).to(q.dtype)


def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, sinkhorn_iters=20, eps=1e-6):
    hc = hc_mult
    m, base, sc = mixes.to(_F64), hc_base.to(_F64), hc_scale.to(_F64)
    pre = torch.sigmoid(m[..., :hc] * sc[0] + base[:hc]) + eps
    post = 2.0 * torch.sigmoid(m[..., hc : 2 * hc] * sc[1] + base[hc : 2 * hc])
    comb = (m[..., 2 * hc :] * sc[2] + base[2 * hc :]).unflatten(-1, (hc, hc))
    comb = torch.softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre.float(), post.float(), comb.float()


def hadamard_transform(x, scale=1.0):
    d = x.size(-1)
    i = torch.arange(d, device=x.device)
    sign = torch.ones(d, d, dtype=_F64, device=x.device)
    bits = i[:, None] & i[None, :]
    for _ in range(d.bit_length()):  # (-1)^popcount(i & j), Sylvester order
        sign = torch.where(bits & 1 == 1, -sign, sign)
        bits = bits >> 1
    return ((x.to(_F64) @ sign) * scale).to(x.dtype)


def _act_quant_identity(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
    if inplace:
        return x
    ones = torch.ones(*x.shape[:-1], x.size(-1) // block_size, dtype=torch.float32, device=x.device)
    return x, ones


def _fp4_act_quant_identity(x, block_size=32, inplace=False):
    if not inplace:
        raise NotImplementedError("golden: FP4 activations only appear as in-place fake-quant in the model")
    return x


@contextmanager
def golden_kernels(quantize_activations: bool = True) -> Iterator[None]:
    """Swap the reference's kernel seam for the float64 golden kernels while the block runs."""
    swap = {
        "fp8_gemm": fp8_gemm,
        "fp4_gemm": fp4_gemm,
        "sparse_attn": sparse_attn,
        "hc_split_sinkhorn": hc_split_sinkhorn,
        "hadamard_transform": hadamard_transform,
    }
    if not quantize_activations:
        swap.update(
            act_quant=_act_quant_identity, act_quant_initial=_act_quant_identity, fp4_act_quant=_fp4_act_quant_identity
        )
    with swapped_kernels(swap):
        yield


@contextmanager
def swapped_kernels(swap: dict) -> Iterator[None]:
    """The reference's kernel seam (`parity.reference.kernels`) with the functions named in `swap` replaced while
    the block runs, and restored after (the golden's kernels, the quantization switches of other engines)."""
    saved = {name: getattr(kernels, name) for name in swap}
    for name, fn in swap.items():
        setattr(kernels, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernels, name, fn)

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
  exact accumulation rounded once to fp32; that is where the hardware's own order is unknowable. (It is a float64
  accumulation, exact while the terms of a sum span less than about 2^28; for inputs beyond that, e.g. a q.k over
  2^30, -2^30 and 2^-60, the result is that of torch's float64 einsum on these operand shapes.)
- `hc_split_sinkhorn`: `m*scale + base` as an fma (nvcc contracts it), row/column sums of 4 rounded once.

Transcendentals (`exp`) are evaluated in float64 and rounded to fp32: correctly rounded, so CPU and CUDA agree;
CUDA's `expf` is within 2 ulp of that. The official wrapper pads attention heads to 16; heads are independent
here, so padding cannot change a value and is skipped.

At the reference's sizes a torch call's fixed cost dominates, so the code keeps calls few: decoded GEMM weights are
memoized per weight tensor (`_WEIGHTS`), act_quant's ue8m0 scales of bf16 inputs come from per-device tables, and
small Sinkhorn batches run on Python floats behind an exactness certificate. Each such step says which of the
facts (E), (P), (R) below keeps it bit-identical to the plain formulation; tests/reference/test_kernels.py pins the
results to independent formulas.
"""

import math
import os
import weakref
from array import array
from collections import OrderedDict
from operator import add, mul, sub, truediv

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
_F64 = torch.float64
# bound on the float64 temporaries of one GEMM chunk (elements)
_GEMM_CHUNK_ELEMS = 1 << 25

# How the emulation stays bit-identical while going fast (each use below names the fact it relies on):
# (E) exact sums: a block product of e4m3 x e4m3 (128 wide) or e4m3 x e2m1 (32 wide) values is exact in float64
#     (products are multiples of 2^-18 below 2^18, block sums stay below 2^25: 43 bits), so any summation order and
#     any GEMM shape or layout give the same float64 value, rounded once to fp32.
# (P) elementwise ops (IEEE +, -, *, /, conversions, max, and torch's float64 exp, which is the same function for
#     every length and stride) give each element the same bits whatever the shape it is computed in; float64 sums of
#     exact products (fp32 x fp32 fits 48 bits) are a single rounding, whatever the operand order.
# (R) reductions that are not exact (fp64 sums of arbitrary fp32 / bf16 products, e.g. q.k over d, P.V over a block,
#     the Sinkhorn row/column sums) depend on the summation order torch/MKL pick from the shape, strides and
#     alignment: those calls get the operands the plain per-block code gives them (same shapes and dtypes, fresh
#     contiguous tensors), so they round exactly as before.


_CONSTS: dict = {}


def _f32(v: float, device) -> torch.Tensor:
    """A Python float as the fp32 literal a TileLang kernel would bake in (a cached 0-dim tensor; never written)."""
    key = (float(v).hex(), device)  # hex: keeps -0.0 and 0.0 apart
    t = _CONSTS.get(key)
    if t is None:
        if len(_CONSTS) >= 256:  # softmax scales are the only per-model values; stay bounded anyway
            _CONSTS.clear()
        with torch.inference_mode(False):
            t = torch.tensor(v, dtype=_F32, device=device)
        _CONSTS[key] = t
    return t


class _DerivedCache:
    """Bounded LRU of values derived from constant tensors (decoded GEMM weights), at most `max_bytes` in all.

    An entry is keyed on its source tensors' identity and is valid while each source is the same live object with
    the same `_version` (bumped by every in-place write through torch, also through views), data pointer, dtype,
    shape and strides; it is dropped when a source is garbage-collected. Writes that bypass the version counter
    (through `.data`, `.numpy()` or a raw storage) are not seen: do not modify weights that way between calls.
    Inference tensors carry no version counter and are never cached. `PARITY_REF_CACHE_MB` sets the budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict = OrderedDict()

    def get(self, kind: str, sources: tuple[torch.Tensor, ...], build):
        try:
            stamp = tuple((t._version, t.data_ptr(), t.dtype, t.shape, t.stride(), t.device) for t in sources)
        except RuntimeError:  # an inference tensor: no version counter to key on
            return build()
        key = (kind, *map(id, sources))
        entry = self._entries.get(key)
        if entry is not None:
            refs, old_stamp, value, _ = entry
            if old_stamp == stamp and all(r() is t for r, t in zip(refs, sources)):
                self._entries.move_to_end(key)
                return value
            self._drop(key)
        value = build()
        nbytes = sum(v.numel() * v.element_size() for v in value)
        if nbytes <= self.max_bytes // 4:
            refs = tuple(weakref.ref(t, lambda ref, key=key: self._drop(key, ref)) for t in sources)
            self._entries[key] = (refs, stamp, value, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
        return value

    def _drop(self, key, dead_ref=None) -> None:
        entry = self._entries.get(key)
        if entry is not None and (dead_ref is None or dead_ref in entry[0]):
            del self._entries[key]
            self.nbytes -= entry[3]

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


_WEIGHTS = _DerivedCache(int(os.environ.get("PARITY_REF_CACHE_MB", "1024")) << 20)


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).to(_F32)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # a*b is exact in float64 for fp32 operands; the sum is rounded to float64 then fp32 (a double rounding that
    # differs from a true fma only when the float64 sum lands exactly on an fp32 rounding midpoint).
    # (P): b and c are promoted to float64 exactly inside the ops, as .double() would
    return (a.double() * b + c).to(_F32)


def _sum(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    """fp32 sum rounded once (via float64): independent of the reduction order."""
    # sum(dtype=float64) reduces x.to(float64) (ATen casts the input first, keeping its strides): the same tensor,
    # hence the same reduction, as x.double().sum() (R)
    return x.sum(dim, keepdim=keepdim, dtype=_F64).to(_F32)


def _group_scales(xf: torch.Tensor, floor: float, max_inv: float, round_scale: bool) -> torch.Tensor:
    # xf: [..., groups, block] fp32 -> s: [..., groups, 1] fp32
    amax = torch.maximum(xf.abs().amax(dim=-1, keepdim=True), _f32(floor, xf.device))
    v = amax * _f32(max_inv, xf.device)
    return pow2_ceil(v) if round_scale else v


_SCALE_TABLES: dict = {}


def _bf16_scale_tables(floor: float, max_inv: float, device):
    """_group_scales(.., round_scale=True) of every bf16 group absmax, indexed by the absmax bits (sign cleared):
    (scales fp32, their reciprocals, their e8m0 bytes, the int16 mask 0x7fff), each table [0x8000]. Built once per
    device by _group_scales itself, one group per value (P)."""
    key = (floor, max_inv, device)
    tables = _SCALE_TABLES.get(key)
    if tables is None:
        with torch.inference_mode(False):
            amax = torch.arange(0x8000, dtype=torch.int32, device=device).to(torch.int16).view(torch.bfloat16)
            s = _group_scales(amax.float()[:, None], floor, max_inv, True)[:, 0]
            magnitude = torch.tensor(0x7FFF, dtype=torch.int16, device=device)
            tables = (s, torch.reciprocal(s), s.to(torch.float8_e8m0fnu).view(torch.uint8), magnitude)
        _SCALE_TABLES[key] = tables
    return tables


class _Scaled:
    """x / s for the groups of x, and the group scales s, the way the torch code computes them: `_group_scales`
    on x.float(), then fp32 division. For bf16 x with ue8m0 scales the same values come from tables: the absmax of a
    bf16 group is one of 0x8000 magnitudes and its scale a function of it, looked up by the largest magnitude bits
    (|x| orders like its bits; NaN bits sit above inf, and map, like any NaN absmax in the torch code, to
    pow2_ceil(NaN) = -0.0). The scale is then a power of two, +inf or -0.0, and x / s is x * (1 / s) exactly (the
    same correctly rounded value, the same NaNs; checked for every bf16 x against every table scale), which casts
    the bf16 x inside the multiply."""

    def __init__(self, x: torch.Tensor, block_size: int, floor: float, max_inv: float, round_scale: bool):
        self.shape = (*x.shape[:-1], x.size(-1) // block_size, block_size)  # [..., n/block, block]
        if round_scale and x.dtype == torch.bfloat16:
            self.tables = _bf16_scale_tables(floor, max_inv, x.device)
            self.idx = (x.view(torch.int16).view(self.shape) & self.tables[3]).amax(dim=-1).long()
            self.y = torch.mul(x.view(self.shape), torch.take(self.tables[1], self.idx).unsqueeze(-1))
            self.s = None
        else:
            self.tables = None
            xf = x.float().view(self.shape)
            self.s = _group_scales(xf, floor, max_inv, round_scale)
            self.y = xf / self.s

    def scales(self) -> torch.Tensor:
        """s: [..., n/block, 1] fp32."""
        if self.s is None:
            self.s = torch.take(self.tables[0], self.idx).unsqueeze(-1)
        return self.s

    def scale_output(self, dtype: torch.dtype) -> torch.Tensor:
        """s: [..., n/block] in `dtype`."""
        if self.tables is not None and dtype == torch.float8_e8m0fnu:
            return torch.take(self.tables[2], self.idx).view(torch.float8_e8m0fnu)
        return self.scales().squeeze(-1).to(dtype)


def _act_quant_impl(x, block_size, scale_fmt, scale_dtype, inplace, inner_dtype):
    n = x.size(-1)
    assert n % block_size == 0, f"act_quant: last dim {n} is not a multiple of block_size {block_size}"
    if scale_fmt is None and scale_dtype == torch.float8_e8m0fnu:
        raise ValueError("act_quant: e8m0 scales need scale_fmt='ue8m0' (the official model never mixes them)")
    q = _Scaled(x, block_size, 1e-4, 1.0 / FP8_MAX, scale_fmt is not None)
    y = q.y.clamp_(-FP8_MAX, FP8_MAX)
    if inplace:
        y = (y.to(inner_dtype).to(_F32) * q.scales()).to(x.dtype).flatten(-2)
        x.copy_(y)
        return x
    return y.to(torch.float8_e4m3fn).flatten(-2), q.scale_output(scale_dtype)


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
    q = _Scaled(x, block_size, FP4_MAX * 2.0**-126, 1.0 / FP4_MAX, True)
    y = round_to_e2m1(q.y.clamp_(-FP4_MAX, FP4_MAX))
    if inplace:
        x.copy_((y * q.scales()).to(x.dtype).flatten(-2))
        return x
    packed = pack_fp4(e2m1_codes(y.flatten(-2)))
    return packed.view(torch.float4_e2m1fn_x2), q.scale_output(torch.float8_e8m0fnu)


def _gemm_operands(a, a_s, b, b_s, bk: int):
    """Check the official wrapper's asserts; return (A e4m3 as [K/bk, M, bk] blocks (a view), activation scales fp32
    [M, K/128 (or more)])."""
    assert a.is_contiguous() and b.is_contiguous(), "Input tensors must be contiguous"
    assert a_s.is_contiguous() and b_s.is_contiguous(), "Scaling factor tensors must be contiguous"
    k = a.size(-1)
    m = a.numel() // k
    return a.view(m, k // bk, bk).transpose(0, 1), _scale_as_float(a_s).view(m, -1)


def _blocks_first(sa: torch.Tensor, kb: int) -> torch.Tensor:
    """Activation scales [M, >=kb] -> [kb, M, 1] (the first kb columns)."""
    return (sa if sa.size(1) == kb else sa[:, :kb]).t().unsqueeze(-1)


def _scale_as_float(s: torch.Tensor) -> torch.Tensor:
    return e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s.float()


def _blocked_gemm(a_blocks: torch.Tensor, w: torch.Tensor, scaled) -> torch.Tensor:
    """C[M, N] = sum over K-blocks k (ascending) of `scaled(fl32(A_k . B_k^T), k0, k1)[k - k0]`, in fp32.

    a_blocks: [K/bk, M, bk] e4m3 (any exactly-representable dtype), w: [K/bk, bk, N] float64 (exact e4m3 / e2m1
    values), the weight blocks already laid out for `bmm`; `scaled(p, k0, k1)` scales the fp32 block products of
    blocks k0..k1-1 ([k1-k0, M, N]) with the kernel's fp32 operation order (P).
    """
    kb, m, _ = a_blocks.shape
    n = w.shape[2]
    acc = None
    step = max(1, _GEMM_CHUNK_ELEMS // max(1, m * n))
    for k0 in range(0, kb, step):
        k1 = min(kb, k0 + step)
        a_k, w_k = (a_blocks, w) if k1 - k0 == kb else (a_blocks[k0:k1], w[k0:k1])
        # (E): every block product is an exact float64 sum, whatever order bmm adds it in; rounded once to fp32
        for t in scaled(torch.bmm(a_k.double(), w_k).to(_F32), k0, k1).unbind(0):
            # the kernel's C += P * scale, ascending K; starting from t + 0 is 0 + t (both give +0 for -0, keep NaN)
            acc = t + _f32(0.0, t.device) if acc is None else acc.add_(t)
    return torch.zeros(m, n, dtype=_F32, device=a_blocks.device) if acc is None else acc


def _gemm_output(acc: torch.Tensor, lead_shape) -> torch.Tensor:
    # the TileLang kernels store bf16; the wrapper allocates the output in the default dtype
    out = acc.to(torch.bfloat16)
    if torch.get_default_dtype() != torch.bfloat16:
        out = out.to(torch.get_default_dtype())
    return out.view(*lead_shape, acc.shape[-1])


def _fp8_weight(b: torch.Tensor, b_s: torch.Tensor, k: int):
    """(B as float64 [K/128, 128, N], weight scales fp32 [K/128, 1, N]), memoized per weight tensor."""

    def build():
        n = b.size(0)
        kb = k // 128
        # e4m3 -> float64 is exact, so laying the codes out block-major first gives the same values: one float64 copy
        # of the weight alive at a time (8 bytes per element, plus the 1-byte reordered codes), not two
        w = b.view(n, kb, 128).permute(1, 2, 0).contiguous().double()
        sb = _scale_as_float(b_s).repeat_interleave(128, dim=0)[:n, :kb]  # [N, K/128]: row r uses block r // 128
        return w, sb.t().contiguous()[:, None, :]

    return _WEIGHTS.get(f"fp8 K={k}", (b, b_s), build)


def _fp4_weight(b: torch.Tensor, b_s: torch.Tensor, k: int):
    """(B as float64 [K/32, 32, N], weight scales fp32 [K/32, 1, N]), memoized per weight tensor."""

    def build():
        n = b.size(0)
        kb = k // 32
        # e2m1 values are exact in e4m3, fp32 and float64
        w = fp4_to_float(b.view(torch.uint8)).view(n, kb, 32).permute(1, 2, 0).double().contiguous()
        return w, _scale_as_float(b_s)[:, :kb].t().contiguous()[:, None, :]

    return _WEIGHTS.get(f"fp4 K={k}", (b, b_s), build)


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
    k = a.size(-1)
    a_blocks, sa = _gemm_operands(a, a_s, b, b_s, 128)  # [kb, M, 128], [M, K/128]
    w, sb = _fp8_weight(b, b_s, k)  # [kb, 128, N], [kb, 1, N]
    sa = _blocks_first(sa, w.shape[0])  # [kb, M, 1]

    def scaled(p, k0, k1):
        # the kernel forms sa*sb first (Scale_C), then C += P * Scale_C
        return p.mul_(sa * sb if k1 - k0 == len(sb) else sa[k0:k1] * sb[k0:k1])

    return _gemm_output(_blocked_gemm(a_blocks, w, scaled), a.shape[:-1])


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
    k = a.size(-1)
    a_blocks, sa = _gemm_operands(a, a_s, b, b_s, 32)  # [kb, M, 32], [M, K/128]
    w, sb = _fp4_weight(b, b_s, k)  # [kb, 32, N], [kb, 1, N]
    sa = _blocks_first(sa.repeat_interleave(4, dim=1), w.shape[0])  # [kb, M, 1]: block j uses sa[:, j // 4]

    def scaled(p, k0, k1):
        return p.mul_(sa).mul_(sb) if k1 - k0 == len(sb) else p.mul_(sa[k0:k1]).mul_(sb[k0:k1])

    return _gemm_output(_blocked_gemm(a_blocks, w, scaled), a.shape[:-1])


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
    idx = topk_idxs.long()
    valid = idx != -1
    slot = idx.clamp(min=0)  # a -1 slot reads zeros, never memory
    # The float64 products below are not exact sums for every bf16 input, so their summation order matters (R):
    # each block's operands are the tensors the per-block code always built (fresh, contiguous, same shapes).
    for t0 in range(0, k, SPARSE_ATTN_BLOCK):
        blk = slice(t0, t0 + SPARSE_ATTN_BLOCK)
        v = valid[:, :, blk]  # [b, m, w]
        kv64 = torch.where(v[..., None], kv[batch, slot[:, :, blk]].double(), 0.0)  # [b, m, w, d]
        s = torch.einsum("bmhd,bmwd->bmhw", q64, kv64).to(_F32)
        s = torch.where(v[:, :, None, :], s, neg_inf).mul_(scale)
        new_max = torch.maximum(row_max, s.amax(dim=-1))
        alpha = _exp(row_max - new_max)
        p = _exp(s - new_max[..., None])  # [b, m, h, w]
        # _fma(denom, alpha, _sum(p)): sum(dtype=) casts p to float64 first, like .double(); then the exact fp32 x
        # fp32 product plus the sum (+ is commutative) in float64, rounded to fp32
        denom = torch.addcmul(p.sum(-1, dtype=_F64).to(_F32), denom.double(), alpha).to(_F32)
        pv = torch.einsum("bmhw,bmwd->bmhd", p.to(torch.bfloat16).double(), kv64)
        # the fp32 product acc * alpha is promoted to float64 exactly inside the add, as .double() would (P)
        acc = torch.add(acc * alpha[..., None], pv).to(_F32)
        row_max = new_max
    denom = denom + _exp(attn_sink.float() - row_max)
    return (acc / denom[..., None]).to(q.dtype)


def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    # TVM legalizes T.sigmoid to 1 / (1 + exp(-x)); torch evaluates `1.0 / t` as t.reciprocal() * 1.0, the same
    # IEEE division, and 1 + t is t + 1: written with fp32 0-dim operands to skip wrapping Python numbers (P)
    return torch.reciprocal(_exp(-x).add_(_f32(1.0, x.device)))


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
    if mixes.device.type == "cpu" and mixes.numel() <= _SINKHORN_PY_MAX * (2 + hc_mult) * hc_mult:
        out = _sinkhorn_py(mixes, hc_scale, hc_base, hc_mult, sinkhorn_iters, eps)
        if out is not None:
            return out
    hc = hc_mult
    dev = mixes.device
    e = _f32(eps, dev)
    m = mixes.float()
    base = hc_base.float()
    sc = hc_scale.float()
    # the op sequence (hence every intermediate's layout, which the sums below depend on (R)) is the official one;
    # only the helpers are cheaper: _fma/_sum promote inside the ops, and the updates divide in place (same layout)
    pre = _sigmoid(_fma(m[..., :hc], sc[0], base[:hc])) + e
    post = _f32(2.0, dev) * _sigmoid(_fma(m[..., hc : 2 * hc], sc[1], base[hc : 2 * hc]))
    comb = _fma(m[..., 2 * hc :], sc[2], base[2 * hc :]).unflatten(-1, (hc, hc))  # [b, s, j, k]
    comb = _exp(comb - comb.amax(dim=-1, keepdim=True))
    comb = comb / _sum(comb, -1, keepdim=True) + e
    comb /= _sum(comb, -2, keepdim=True).add_(e)
    for _ in range(sinkhorn_iters - 1):
        comb /= _sum(comb, -1, keepdim=True).add_(e)
        comb /= _sum(comb, -2, keepdim=True).add_(e)
    return pre, post, comb


# A decode step calls hc_split_sinkhorn on one token: 4x4 values through 40 normalizations, where torch's per-call
# overhead is all the cost. Up to this many matrices, a CPU call runs the same arithmetic on Python floats.
_SINKHORN_PY_MAX = 8
# The Sinkhorn sums add hc fp32 values in float64. If all of them are finite and >= 0, with mx <= mn * 2^26 for the
# largest value mx and the smallest positive one mn, the sums are exact: with e = floor(log2 mn), every value is a
# multiple of u = 2^(e - 23) (of 2^-149 if mn is subnormal), and every partial sum is <= hc * mx < hc * 2^(e + 27)
# <= 2^53 u for hc <= 8, hence representable. Then torch's reduction order cannot matter.
_SINKHORN_CERT = 2.0**26
_FLT_MAX = float(torch.finfo(torch.float32).max)


def _fl32(values) -> list[float]:
    """Python floats rounded to fp32 (the C cast: round to nearest even), as Python floats again (exact)."""
    return array("f", values).tolist()


def _sinkhorn_py(mixes, hc_scale, hc_base, hc, iters, eps):
    """hc_split_sinkhorn's torch code on Python floats (IEEE doubles) for a few matrices; None (the torch code runs)
    unless every value is finite and every sum certified exact (_SINKHORN_CERT).

    Each fp32 operation of the torch code is done in double and rounded to fp32: a product of two fp32 values is
    exact in double, and for +, -, * and / of fp32 operands one double rounding followed by one fp32 rounding gives
    the correctly rounded fp32 result (53 >= 2 * 24 + 2), so the same bits; _fma's float64 arithmetic is done as is.
    exp is torch's float64 exp, on all arguments at once (P)."""
    m = mixes.float()
    if not m.is_contiguous() or hc > 8 or m.shape[-1] != (2 + hc) * hc or m.numel() == 0:
        return None
    sc, base = hc_scale.float().reshape(-1).tolist(), hc_base.float().reshape(-1).tolist()
    n2, hcs = hc * hc, range(hc)
    if len(sc) != 3 or len(base) != 2 * hc + n2:
        return None
    nm = m.numel() // ((2 + hc) * hc)
    # the scale of each mixes column: sc[0] for pre, sc[1] for post, sc[2] for comb
    col_scale = [sc[0]] * hc + [sc[1]] * hc + [sc[2]] * n2
    z = []
    for r in m.view(nm, -1).tolist():
        # _fma in float64: the fp32 x fp32 product is exact, the sum rounds once; then fp32
        v = list(map(add, map(mul, r, col_scale), base))
        if not all(abs(x) <= _FLT_MAX for x in v):  # also NaN; no double is cast to fp32 outside its range
            return None
        v = _fl32(v)
        comb = v[2 * hc :]
        maxes = [max(comb[j * hc : j * hc + hc]) for j in hcs]
        shifted = list(map(sub, comb, [x for x in maxes for _ in hcs]))  # >= -2 FLT_MAX, <= 0
        if min(shifted) < -_FLT_MAX:
            return None
        z += [-x for x in v[: 2 * hc]] + _fl32(shifted)
    if max(z) > 80.0:  # exp(80) < FLT_MAX: no fp32 overflow below
        return None
    ez = _fl32(torch.exp(torch.tensor(z, dtype=_F64)).tolist())
    e = _fl32([eps])[0]
    add_e = e.__add__  # e + x is x + e
    width = 2 * hc + n2
    pre, post, out = [], [], []
    for t in range(nm):
        ex = ez[t * width : (t + 1) * width]
        sig = _fl32(map(truediv, [1.0] * (2 * hc), _fl32(x + 1.0 for x in ex[: 2 * hc])))  # 1 / (1 + exp(-x))
        pre += _fl32(map(add_e, sig[:hc]))
        post += [2.0 * x for x in sig[hc:]]  # exact
        c = ex[2 * hc :]  # row-major [j, k]
        if not max(c) <= min((x for x in c if x > 0.0), default=math.inf) * _SINKHORN_CERT:
            return None
        rs = _fl32([sum(c[j * hc : j * hc + hc]) for j in hcs])
        c = _fl32(map(add_e, _fl32(map(truediv, c, [x for x in rs for _ in hcs]))))
        for step in range(max(1, 2 * iters - 1)):  # column, row, column, ...: as the torch code's loop
            if not max(c) <= min(c) * _SINKHORN_CERT:  # all > 0 from here; a 0 fails, as it should
                return None
            if step % 2 == 0:
                d = _fl32(map(add_e, _fl32([sum(c[k::hc]) for k in hcs])))
                c = _fl32(map(truediv, c, d * hc))
            else:
                d = _fl32(map(add_e, _fl32([sum(c[j * hc : j * hc + hc]) for j in hcs])))
                c = _fl32(map(truediv, c, [x for x in d for _ in hcs]))
        out += c
    lead = m.shape[:-1]
    return (
        torch.tensor(pre, dtype=_F32).view(*lead, hc),
        torch.tensor(post, dtype=_F32).view(*lead, hc),
        torch.tensor(out, dtype=_F32).view(*lead, hc, hc),
    )


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

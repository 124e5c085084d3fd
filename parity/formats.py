"""Bit-level helpers for the V4 number formats: FP8 e4m3, FP4 e2m1 (packed two per byte), ue8m0 scales.

Everything here is exact integer/bit arithmetic or a single IEEE rounding, so the results do not depend on the
device. Used by the reference kernels, the checkpoint writer/reader and the optimized runtime.
"""

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 128  # weight block (128 x 128) and activation group along K
FP4_BLOCK = 32  # FP4 weight / activation group along K

# magnitude of an e2m1 code's low 3 bits; bit 3 is the sign (spec §2.2)
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# all 16 codes, code 8 is -0.0
E2M1_VALUES = E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES)


_TABLES: dict = {}


def _table(name: str, values, dtype: torch.dtype, device) -> torch.Tensor:
    """A small constant lookup tensor, built once per (name, device) (a handful of entries in all; never written)."""
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.tensor(values, dtype=dtype, device=device)
        _TABLES[key] = t
    return t


def _scalars(name: str, values, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Constant 0-dim tensors, built once per (name, device): an op with a 0-dim operand of the tensor's own dtype
    computes exactly what it computes with the Python number, without wrapping the number on every call."""
    key = (name, device)
    t = _TABLES.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.tensor(values, dtype=dtype, device=device).unbind()
        _TABLES[key] = t
    return t


def pow2_ceil(v: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 v) for positive normal fp32 `v`, computed from the IEEE bits like the official
    `fast_log2_ceil` + `fast_pow2`: the unbiased exponent, plus one if any mantissa bit is set.

    For every fp32 bit pattern (sign ignored): with u = |bits| as an integer, exponent + (mantissa != 0) equals
    ceil(u / 2^23) = ((u - 1) >> 23) + 1 (also for u = 0: -1 >> 23 is -1), so five integer ops give the result.
    Like the official helpers, an exponent field of 255 with a mantissa (NaN) yields the bits 256 << 23 (-0.0)."""
    assert v.dtype == torch.float32
    if v.numel() == 0:
        return torch.empty(v.shape, dtype=torch.float32, device=v.device)
    mask, one, shift = _scalars("pow2_ceil", (0x7FFFFFFF, 1, 23), torch.int32, v.device)
    u = v.view(torch.int32) & mask
    u -= one
    u >>= shift  # arithmetic: 0 - 1 stays -1
    u += one
    u <<= shift  # torch shifts int32 as uint32: 256 << 23 is 0x80000000
    return u.view(torch.float32)


# spec §3.3 as (upper edge, edge included, magnitude): every edge is a tie between two codes, and the tie goes to
# the even code, so the edge is included when the lower neighbour's code is even. Above 5 saturates to 6.
E2M1_RNE_TABLE = (
    (0.25, True, 0.0),
    (0.75, False, 0.5),
    (1.25, True, 1.0),
    (1.75, False, 1.5),
    (2.5, True, 2.0),
    (3.5, False, 3.0),
    (5.0, True, 4.0),
)


def _e2m1_rne_edges(device) -> torch.Tensor:
    # E2M1_RNE_TABLE's edges as fp32 "a <= edge" thresholds: an excluded edge e becomes the fp32 just below it
    # (a < e <=> a <= nextafter(e, 0) for fp32 a)
    key = ("e2m1_rne_edges", device)
    t = _TABLES.get(key)
    if t is None:
        with torch.inference_mode(False):
            edges = torch.tensor([e for e, _, _ in E2M1_RNE_TABLE], dtype=torch.float32, device=device)
            included = torch.tensor([inc for _, inc, _ in E2M1_RNE_TABLE], device=device)
            t = torch.where(included, edges, torch.nextafter(edges, torch.zeros_like(edges)))
        _TABLES[key] = t
    return t


def _e2m1_rne_index(a: torch.Tensor) -> torch.Tensor:
    """fp32 magnitudes -> their e2m1 magnitude code 0..7: that of the first (lowest) E2M1_RNE_TABLE edge the value
    lies inside, i.e. the number of edges it lies above; bucketize counts them in one op (NaN sorts above all edges:
    6, as in the where-chain)."""
    return torch.bucketize(a, _e2m1_rne_edges(a.device))


def round_to_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the e2m1 grid like CUDA `__nv_cvt_float_to_fp4(.., cudaRoundNearest)`: nearest, ties to the
    even code, saturating at 6, sign kept (so -0.25 -> -0.0). Returns fp32."""
    a = v.abs()
    if v.dtype == torch.float32:
        idx = _e2m1_rne_index(a)
        mag = _table("e2m1_magnitudes", E2M1_MAGNITUDES, torch.float32, v.device)[idx]
        return torch.copysign(mag, v)
    mag = torch.full_like(a, FP4_MAX)
    for edge, included, m in reversed(E2M1_RNE_TABLE):
        inside = a <= edge if included else a < edge
        mag = torch.where(inside, m, mag)
    return torch.copysign(mag, v)


def e2m1_rne_codes(v: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (uint8) of `round_to_e2m1(v)`, without making its values first: for fp32 the magnitude code is
    the same bucketize index `round_to_e2m1` takes its magnitude from, and the sign is v's (copysign's), so one pass
    does what `e2m1_codes(round_to_e2m1(v))` does in two plus a grid check. Other dtypes: exactly that."""
    if v.dtype != torch.float32:
        return e2m1_codes(round_to_e2m1(v))
    idx = _e2m1_rne_index(v.abs()).to(torch.uint8)
    return idx | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) of fp32 values that already lie on the e2m1 grid."""
    a = v.abs()
    mags = _table("e2m1_magnitudes", E2M1_MAGNITUDES, torch.float32, v.device)
    if v.dtype == torch.float32:
        # the number of nonzero magnitudes <= a (bucketize with right=True counts the boundaries <= a)
        idx = torch.bucketize(a, mags[1:], right=True).to(torch.uint8)
    else:
        idx = torch.zeros(a.shape, dtype=torch.uint8, device=v.device)
        for m in E2M1_MAGNITUDES[1:]:
            idx += a >= m
    if not torch.equal(mags[idx.long()], a.float()):
        raise ValueError("e2m1_codes: input is not on the e2m1 grid")
    return idx | (torch.signbit(v).to(torch.uint8) << 3)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [..., K] into bytes [..., K/2], low nibble = element 2b, high nibble = 2b+1 (spec §2.2)."""
    assert codes.shape[-1] % 2 == 0
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: bytes [..., K/2] (any 1-byte dtype) -> codes uint8 [..., K]."""
    b = packed.contiguous().view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)


# byte b -> (value of its low nibble, value of its high nibble)
_E2M1_BYTE_PAIRS = tuple((E2M1_VALUES[b & 0xF], E2M1_VALUES[b >> 4]) for b in range(256))


def fp4_codes_to_float(codes: torch.Tensor) -> torch.Tensor:
    return _table("e2m1_values", E2M1_VALUES, torch.float32, codes.device)[codes.long()]


def fp4_to_float(packed: torch.Tensor) -> torch.Tensor:
    """Decode packed FP4 (int8 / uint8 / float4_e2m1fn_x2 bytes [..., K/2]) to fp32 [..., K] (no scale)."""
    # one lookup per byte: row b of the table is (value of the low nibble, value of the high nibble)
    table = _table("e2m1_byte_pairs", _E2M1_BYTE_PAIRS, torch.float32, packed.device)
    return table[packed.contiguous().view(torch.uint8).long()].flatten(-2)


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """ue8m0 scale (float8_e8m0fnu or its uint8 bytes) -> fp32 2^(byte-127). Exact."""
    if s.dtype == torch.float8_e8m0fnu:
        return s.float()
    assert s.dtype == torch.uint8
    return s.view(torch.float8_e8m0fnu).float()


def float_to_e8m0(p: torch.Tensor) -> torch.Tensor:
    """Exact powers of two (fp32) -> float8_e8m0fnu. Refuses values that are not powers of two."""
    bits = p.contiguous().view(torch.int32)
    if bool(((bits & 0x7FFFFF) != 0).any()) or bool((p <= 0).any()):
        raise ValueError("float_to_e8m0: scales must be positive powers of two")
    return ((bits >> 23) & 0xFF).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] fp32 -> (e4m3 [N, K], ue8m0 scale [ceil(N/block), ceil(K/block)]) with power-of-two block
    scales chosen so that the block's absmax fits 448 (the format of the official FP8 checkpoints)."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = w.new_zeros(nb * block, kb * block)
    padded[:n, :k] = w
    blocks = padded.view(nb, block, kb, block).float()
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)  # [nb, kb]
    scale = pow2_ceil(amax * torch.tensor(1.0 / FP8_MAX, dtype=torch.float32))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    q = q.view(nb * block, kb * block)[:n, :k].contiguous()
    return q, float_to_e8m0(scale)


def dequantize_fp8_blocks(w: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """e4m3 [N, K] with ue8m0 scale [ceil(N/b), ceil(K/b)] -> fp32 [N, K]. Exact (a power-of-two scaling)."""
    s = e8m0_to_float(scale)
    s = s.repeat_interleave(block, dim=0)[: w.shape[0]].repeat_interleave(block, dim=1)[:, : w.shape[1]]
    return w.float() * s


def quantize_fp4_groups(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [N, K] fp32 -> (packed int8 [N, K/2], ue8m0 scale [N, K/block]): the on-disk format of the routed
    experts. Each run of `block` inputs of a row shares a power-of-two scale sized so its absmax fits 6."""
    n, k = w.shape
    assert k % block == 0, f"FP4 weights need K % {block} == 0, got K={k}"
    groups = w.float().view(n, k // block, block)
    amax = groups.abs().amax(dim=-1).clamp(min=FP4_MAX * 2.0**-126)
    scale = pow2_ceil(amax * torch.tensor(1.0 / FP4_MAX, dtype=torch.float32))
    codes = e2m1_rne_codes((groups / scale[..., None]).clamp(-FP4_MAX, FP4_MAX)).view(n, k)
    return pack_fp4(codes).view(torch.int8), float_to_e8m0(scale)


def dequantize_fp4_groups(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Packed FP4 [N, K/2] with ue8m0 scale [N, K/block] -> fp32 [N, K]. Exact."""
    v = fp4_to_float(packed)
    return v * e8m0_to_float(scale).repeat_interleave(block, dim=-1)

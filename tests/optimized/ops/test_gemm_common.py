"""Pieces shared by the GEMM kernels (`parity.optimized.ops.triton._gemm_common`).

The split-K chunk reductions (fp8_gemm, fp4_gemm, dense_linear, moe_experts): in the launch (`last_arrival_sum`, the
tile's last program) and after it (`reduce_chunks`), both must add 0 + ws[0] + ws[1] + ... in chunk order, the
additions of a program that loops over the chunks from zero, so a split launch gives the unsplit one's bits, the
sign of a zero sum included. The e8m0 scale decode (`e8m0_to_f32`, fp8_gemm, fp4_gemm, moe_experts, o_lora): every
byte as torch's float8_e8m0fnu -> float32."""

import pytest
import torch

from parity.optimized.ops.triton import runtime

MODE = runtime.setup()  # before the kernel below is decorated (the interpreter on CPU)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from parity.optimized.ops.triton import _gemm_common as common  # noqa: E402

DEV = "cuda" if MODE == "cuda" else "cpu"


@triton.jit
def _e8m0_kernel(e_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, common.e8m0_to_f32(tl.load(e_ptr + offs)))


@triton.jit
def _sum_kernel(part_ptr, ws_ptr, cnt_ptr, out_ptr, BLOCK: tl.constexpr):
    # grid (tiles, 1, chunks): program (tile, chunk) brings part[chunk, tile], the tile's last arrival stores the sum
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    chunk_numel = tl.num_programs(0) * BLOCK
    acc = tl.load(part_ptr + tl.program_id(2) * chunk_numel + offs)
    mask = offs >= 0
    last, total = common.last_arrival_sum(acc, ws_ptr + offs, chunk_numel.to(tl.int64), cnt_ptr, mask)
    if last:
        tl.store(out_ptr + offs, total)


def _parts(chunks: int, tiles: int, block: int) -> torch.Tensor:
    """fp32 chunk sums whose order matters: rounding (1, 2^-24, 2^-24, ...: in order they never reach 1's ulp),
    cancellation to zero, and all -0 (0 + -0 is +0, -0 + -0 would stay -0)."""
    g = torch.Generator().manual_seed(chunks)
    n = tiles * block
    p = torch.randn(chunks, n, generator=g) * 2.0 ** torch.randint(-30, 30, (chunks, n), generator=g)
    p[:, :4] = torch.tensor([1.0] + [2.0**-24] * (chunks - 1))[:, None]
    p[:, 4:8] = -0.0
    p[0, 8:12], p[1, 8:12] = 3.0, -3.0
    return p.contiguous()


def _want(p: torch.Tensor) -> torch.Tensor:
    total = torch.zeros_like(p[0])
    for c in range(p.shape[0]):
        total += p[c]
    return total


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # torch.equal alone takes -0 for +0


@pytest.mark.parametrize("chunks", [2, 3, 8])
def test_last_arrival_sum_adds_from_zero_in_chunk_order(chunks):
    tiles, block = 3, 16
    p = _parts(chunks, tiles, block)
    ws = torch.full((chunks * tiles * block,), float("nan"), device=DEV)
    cnt = torch.zeros(1024, dtype=torch.int32, device=DEV)
    out = torch.full((tiles * block,), float("nan"), device=DEV)
    _sum_kernel[(tiles, 1, chunks)](p.to(DEV), ws, cnt, out, BLOCK=block)
    want = _want(p)
    assert _same_bits(out.cpu(), want)
    assert not torch.signbit(out[4:8]).any()  # all chunks -0: the unsplit loop's 0 + -0 + ... is +0
    if chunks >= 3:  # the rounding lanes see the order: reversed, the 2^-24s add up to 1's half ulp first
        assert not torch.equal(_want(p.flip(0))[:4], want[:4])
    assert not cnt.any(), "arrival counters left non-zero"


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_reduce_chunks_adds_from_zero_in_chunk_order(chunks):
    p = _parts(max(chunks, 2), 2, 16)[:chunks].contiguous()
    out = torch.full(p.shape[1:], float("nan"), device=DEV)
    common.reduce_chunks(p.to(DEV), out)
    assert _same_bits(out.cpu(), _want(p))
    assert not torch.signbit(out[4:8]).any()  # one chunk of -0: 0 + -0 = +0, as the unsplit loop gives


def test_e8m0_decode_is_torchs_for_every_byte():
    # 0 is the subnormal 2^-127 (not 0), 255 the NaN code: the two bytes a shift-by-23 decode gets wrong
    codes = torch.arange(256, dtype=torch.uint8)
    out = torch.full((256,), 7.0, device=DEV)
    _e8m0_kernel[(1,)](codes.to(DEV), out, N=256)
    want = codes.view(torch.float8_e8m0fnu).float()
    assert _same_bits(out[:255].cpu(), want[:255]) and out[255].isnan()  # NaN payloads differ (torch: 0x7f800001)
    assert want[0] == 2.0**-127 and want[255].isnan()

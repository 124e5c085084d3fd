"""The shared exps of the `sparse_attn` kernels (`ops/triton/_attn_common.py`): `exp_f32` against the correctly
rounded fp32 exp (float64 exp rounded once, the twin's), and `exp_nonpos`, the loops' form for arguments <= 0,
against `exp_f32` bit for bit: in the interpreter on CPU and compiled on CUDA. And `expf_cuda`, the Gluon kernel's,
against torch's exp on CUDA bit for bit (CUDA only: the interpreter has no libdevice)."""

import pytest
import torch

from parity.optimized.ops.triton import runtime

MODE = runtime.setup()  # before the kernel below is decorated

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from parity.optimized.ops.triton._attn_common import exp_f32, exp_nonpos, expf_cuda  # noqa: E402

DEVICE = "cuda" if MODE == "cuda" else "cpu"
BLOCK = 4096


@triton.jit
def _both(x_ptr, full_ptr, nonpos_ptr, n, BLOCK: tl.constexpr, PLANT: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(full_ptr + offs, exp_f32(x), mask=mask)
    if PLANT:  # a planted bug: exp_nonpos with its arguments clamped at -87 instead of its own cut at -87.3
        x = tl.maximum(x, -87.0)
    tl.store(nonpos_ptr + offs, exp_nonpos(x), mask=mask)


def _run(x: torch.Tensor, plant: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(DEVICE)
    full, nonpos = torch.empty_like(x), torch.empty_like(x)
    _both[(triton.cdiv(x.numel(), BLOCK),)](x, full, nonpos, x.numel(), BLOCK=BLOCK, PLANT=plant)
    return full.cpu(), nonpos.cpu()


def _nonpositive() -> torch.Tensor:
    """Every exponent of negative fp32 (random bit patterns with the sign set), the softmax's range densely, and the
    edges: zeros, the underflow cut at -87.3 and its neighbours, subnormals, -inf, NaN."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**31, (1 << 17,), generator=gen, dtype=torch.int64).to(torch.int32) | -(2**31)
    dense = -torch.rand(1 << 16, generator=gen) * 90
    cut = torch.tensor(-87.3, dtype=torch.float32)
    edges = torch.stack(
        [torch.tensor(0.0), torch.tensor(-0.0), cut, torch.nextafter(cut, torch.tensor(0.0)),
         torch.nextafter(cut, torch.tensor(-100.0)), torch.tensor(-1e-45), torch.tensor(float("-inf")),
         torch.tensor(float("nan"))]
    )  # fmt: skip
    return torch.cat([bits.view(torch.float32), dense, edges.float()])


def test_exp_nonpos_is_exp_f32_bit_for_bit():
    x = _nonpositive()
    full, nonpos = _run(x)
    assert torch.equal(full.view(torch.int32), nonpos.view(torch.int32))


def _off_exp(x: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """Where `got` is not exp(x) as `exp_f32` promises: more than 2 ulp from the correctly rounded fp32 exp (float64
    exp rounded once, the twin's) from the cut at -87.3 up, or not 0 below it (results under 1.2e-38, which no output
    can see, are 0 by design)."""
    want = torch.exp(x.double()).float()
    ulp = (torch.nextafter(want, torch.tensor(float("inf"))) - want).double()
    far = (got.double() - want.double()).abs() > 2 * ulp
    return torch.where(x >= -87.3, far, got != 0)


def test_exp_f32_within_two_ulp_of_the_correctly_rounded_exp():
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([_nonpositive(), torch.rand(1 << 16, generator=gen) * 88.7])
    full, _ = _run(x)
    assert not _off_exp(x[~x.isnan()], full[~x.isnan()]).any()
    assert full[x.isnan()].isnan().all()
    specials = _run(torch.tensor([float("inf"), 88.72, 88.75, float("-inf")]))[0]
    assert torch.equal(specials[[0, 2]], torch.tensor([float("inf")] * 2)) and specials[3] == 0
    assert specials[1].isfinite()


def test_a_planted_exp_fails():
    """Both comparisons can fail: a clamp moved by 0.3 changes the results below -87."""
    x = _nonpositive()
    full, nonpos = _run(x, plant=True)
    assert not torch.equal(full.view(torch.int32), nonpos.view(torch.int32))
    assert _off_exp(x[~x.isnan()], nonpos[~x.isnan()]).any()


@triton.jit
def _cuda_exp(x_ptr, y_ptr, n, BLOCK: tl.constexpr, FAST: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if FAST:  # a planted bug: Triton's own exp (MUFU.EX2 of x * log2 e, no reduction step), another rounding
        tl.store(y_ptr + offs, tl.exp(x), mask=mask)
    else:
        tl.store(y_ptr + offs, expf_cuda(x), mask=mask)


def _expf_off_torch(fast: bool = False) -> int:
    """How many results of `expf_cuda` (or the planted fast exp) differ from torch.exp on CUDA over every exponent of
    both signs, the softmax range densely, and the edges. torch's CUDA exp is the same libdevice expf, compiled
    without flush to zero, and so is Triton's here (subnormal results included: measured on an H100, torch 2.11,
    Triton 3.6), so every result must be equal bit for bit."""
    gen = torch.Generator().manual_seed(2)
    bits = torch.randint(-(2**31), 2**31, (1 << 17,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), _nonpositive(), torch.rand(1 << 16, generator=gen) * 88.7]).cuda()
    got = torch.empty_like(x)
    _cuda_exp[(triton.cdiv(x.numel(), BLOCK),)](x, got, x.numel(), BLOCK=BLOCK, FAST=fast)
    want = torch.exp(x)
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    return int((~same).sum())


@pytest.mark.gpu
def test_expf_cuda_is_torch_exp_on_cuda_bit_for_bit():
    assert _expf_off_torch() == 0


@pytest.mark.gpu
def test_a_planted_fast_exp_differs_from_torch_exp():
    assert _expf_off_torch(fast=True) > 0

"""Pieces shared by the mHC mixer kernels (`parity.optimized.ops.triton._mhc`, hc_pre and hc_head).

`split3`: the GPU's mixer GEMM feeds the tensor cores fp32 fn as three bf16 pieces with exact products, so the
pieces must sum back to the weight bit for bit; the GEMM's tolerance tests are in test_hc_pre.py / test_hc_head.py."""

import torch

from parity.optimized.ops.triton import runtime

MODE = runtime.setup()  # before the kernel below is decorated (the interpreter on CPU)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from parity.optimized.ops.triton import _mhc  # noqa: E402

DEV = "cuda" if MODE == "cuda" else "cpu"


@triton.jit
def _pieces_kernel(w_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    hi, mid, lo = _mhc.split3(tl.load(w_ptr + i))
    tl.store(out_ptr + i, hi)
    tl.store(out_ptr + N + i, mid)
    tl.store(out_ptr + 2 * N + i, lo)


def _pieces(w: torch.Tensor) -> torch.Tensor:
    out = torch.full((3, w.numel()), float("nan"), dtype=torch.bfloat16, device=DEV)
    _pieces_kernel[(1,)](w.to(DEV), out, N=w.numel())
    return out.cpu().double()


def test_three_bf16_pieces_sum_to_the_fp32_weight_exactly():
    # over fp32's range down to ~2^-110 (where lo stays a normal bf16): signs, every exponent, ties of the bf16
    # rounding, all 24 significant bits set
    g = torch.Generator().manual_seed(3)
    n = 4000
    mant = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    expo = torch.randint(-110, 127, (n,), generator=g).double()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    special = torch.tensor([0.0, 1.0, -1.0, 1 + 2.0**-8, 1 + 2.0**-8 + 2.0**-16, 1 + 2.0**-9, 2 - 2.0**-23,
                            -(2 - 2.0**-23) * 2.0**100, 2.0**-110 * (1 + 2.0**-23), 2.0**-7 * (1 + 3 * 2.0**-23)],
                           dtype=torch.float64)  # fmt: skip
    w = torch.cat([sign * mant * 2.0**expo, special]).float()
    w = torch.cat([w, torch.zeros(4096 - w.numel())])
    hi, mid, lo = _pieces(w)
    assert torch.equal(hi + mid + lo, w.double())
    assert torch.equal(hi, w.to(torch.bfloat16).double())  # hi is the weight rounded to bf16
    assert (mid != 0).sum() > n // 2 and (lo != 0).sum() > n // 2  # the weights need all three pieces


def test_two_pieces_would_not_be_exact():
    # the planted counterpart: hi + mid alone misses most weights' last 8 bits (the check above can fail)
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(4096, generator=g) * 0.01).float()
    hi, mid, _ = _pieces(w)
    assert (hi + mid != w.double()).sum() > 4096 // 2

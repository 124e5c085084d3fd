"""Judging GEMM outputs of backends that are not bitwise (helper of the GEMM-side op tests, not a test module).

`conftest.check` lets an element be at most `ulps` output ulps further from the float64 math than the twin is.
For a dot product that is the wrong yardstick where the terms cancel: the result is small, its ulp is tiny, and
any other summation order (a tensor-core MMA, a tiled fp32 loop) moves it by a fraction of the *terms'* size, not
of the result's. The textbook forward error bound of a sum is relative to sum|a_k b_k| instead, so `check_gemm`
first accepts every element whose distance to the float64 math exceeds the twin's by no more than such a bound
(`allowance`, computed by the test from |A| . |B|^T), and hands the rest to `check` unchanged.
"""

import torch

from tests.optimized.ops.conftest import BackendImpl, check

# relative accumulation error of one 128-wide FP8 block product P_k = A_k . B_k^T, against sum |a b| of the block:
# Hopper's FP8 tensor cores keep about 14 bits while accumulating (DeepSeek-V3 report §3.3.2), 2^-12 leaves margin;
# the CPU interpreter sums the exact products in fp32 (at most 128 roundings of 2^-24: 2^-17)
FP8_BLOCK_BITS = {"cuda": 12, "cpu": 17}


def fp8_block_allowance(abs_sum: torch.Tensor, n_blocks: int, device: str) -> torch.Tensor:
    """Error bound of the kernels' block GEMMs beyond the twin's: each block product within 2^-bits of its absolute
    sum, plus the fp32 additions of the n_blocks scaled partials (grouped by chunks rather than strictly in order:
    at most n_blocks roundings of 2^-24)."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    return abs_sum * (2.0 ** -FP8_BLOCK_BITS[kind] + n_blocks * 2.0**-24)


def fp32_sum_allowance(abs_sum: torch.Tensor, k: int) -> torch.Tensor:
    """Recursive fp32 summation of k exact products in any order, rounding toward zero included: k * 2^-23."""
    return abs_sum * (k * 2.0**-23)


def check_gemm(impl: BackendImpl, got, want, golden, allowance) -> None:
    """`check`, except that for a backend that is not bitwise an element with |got - golden| <= |want - golden| +
    allowance counts as the twin's own value (NaN never qualifies: NaN compares false)."""
    if not impl.bitwise:
        a, b, g = want.double(), got.double(), golden.double()
        within = (b - g).abs() <= (a - g).abs() + allowance.double()
        got = torch.where(within, want, got)
    check(impl, got, want, golden=golden)

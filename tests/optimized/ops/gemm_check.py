"""Judging GEMM outputs of backends that are not bitwise (helper of the GEMM-side op tests, not a test module).

`conftest.check` lets an element be at most `ulps` output ulps further from the float64 math than the twin is.
For a dot product that is the wrong yardstick where the terms cancel: the result is small, its ulp is tiny, and
any other summation order (a tensor-core MMA, a tiled fp32 loop) moves it by a fraction of the *terms'* size, not
of the result's. The textbook forward error bound of a sum is relative to sum|a_k b_k| instead, so `check_gemm`
first accepts every element whose distance to the float64 math exceeds the twin's by no more than such a bound
(`allowance`, computed by the test from |A| . |B|^T), and hands the rest to `check` unchanged.
"""

import pytest
import torch

from tests.optimized.ops.conftest import BackendImpl, check

# relative error of one FP8 block product P_k = A_k . B_k^T (32 or 128 wide) against sum |a b| of the block, per
# device: Hopper's FP8 tensor cores keep about 14 bits while accumulating (DeepSeek-V3 report §3.3.2), 2^-12 leaves
# margin; the CPU interpreter runs the kernels' block products as float64 dots of the exact products, which is exact
# for e4m3 / e2m1 operands and rounds once to fp32 like the twin (None: no allowance)
FP8_BLOCK_BITS = {"cuda": 12, "cpu": None}


def fp8_block_allowance(abs_sum: torch.Tensor, n_blocks: int, device, regrouped: bool = True) -> torch.Tensor:
    """Error bound of a kernel's block GEMM beyond the twin's: each block product within 2^-bits of its absolute
    sum, plus n_blocks fp32 roundings of 2^-24 (the accumulation of the scaled partials, which rounds differently
    once the partials differ, or which the kernel groups differently: `regrouped`, fp8_gemm / fp4_gemm with more
    than 8 K blocks). Zero where both are exact and in the twin's order (the interpreter's moe kernels)."""
    bits = FP8_BLOCK_BITS["cuda" if str(device).startswith("cuda") else "cpu"]
    if bits is None and not regrouped:
        return torch.zeros_like(abs_sum)
    return abs_sum * ((0.0 if bits is None else 2.0**-bits) + n_blocks * 2.0**-24)


def fp32_sum_allowance(abs_sum: torch.Tensor, k: int) -> torch.Tensor:
    """Recursive fp32 summation of k exact products in any order, rounding toward zero included: k * 2^-23."""
    return abs_sum * (k * 2.0**-23)


def check_gemm(impl: BackendImpl, got, want, golden, allowance, ulps: float = 1.0) -> None:
    """`check`, except that for a backend that is not bitwise an element with |got - golden| <= |want - golden| +
    allowance counts as the twin's own value (NaN never qualifies: NaN compares false)."""
    if not impl.bitwise:
        a, b, g = want.double(), got.double(), golden.double()
        within = (b - g).abs() <= (a - g).abs() + allowance.double()
        got = torch.where(within, want, got)
    check(impl, got, want, golden=golden, ulps=ulps)


def rounding_span(center: torch.Tensor, delta: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """How far apart two roundings (fp32, then `dtype`) of any two values in [center - delta, center + delta] can
    be: 0 where the interval holds no rounding boundary of `dtype`."""
    lo = (center - delta).float().to(dtype).double()
    hi = (center + delta).float().to(dtype).double()
    return hi - lo


# ---- split-K launches (fp8_gemm, fp4_gemm): the chunk sums added in chunk order, in or after the launch ------------

SPLIT_BUGS = ["stale counts of an aborted launch", "counters not reset", "a chunk skipped"]


def check_split_launch(run, monkeypatch, n_chunks: int):
    """`run(split)` calls the op with K split (True) or not; with NaN-filled output and workspace this asserts (a)
    the split output is the bf16 of the workspace's `n_chunks` chunk sums added in chunk order (computed here in
    torch) and the unsplit launch's, (b) the arrival counters are all zero afterwards, (c) a second launch on the
    same counters gives the same bits. Returns the workspace and the output."""
    from parity.optimized.ops.triton import _gemm_common as common
    from parity.reference import model as ref

    workspaces, empty = [], common.empty

    def spy(*shape, dtype, device):
        t = empty(*shape, dtype=dtype, device=device)
        if dtype == torch.float32:
            workspaces.append(t)
        return t

    monkeypatch.setattr(common, "POISON", True)
    monkeypatch.setattr(common, "empty", spy)
    with ref.default_dtype(torch.bfloat16):
        out = run(True)
        (ws,) = workspaces
        assert ws.shape == (n_chunks, *out.shape) and not ws.isnan().any()
        total = torch.zeros_like(ws[0])
        for part in ws:
            total += part  # fp32, IEEE round to nearest: the kernel's additions, from zero
        assert torch.equal(out, total.to(torch.bfloat16))
        assert torch.equal(out, run(False))
        assert not common.tile_counters(out.device, 0).any(), "arrival counters left non-zero"
        assert torch.equal(run(True), out)
    return ws, out


def check_planted_split_bug(run, monkeypatch, n_chunks: int, bug: str, device) -> None:
    """One of SPLIT_BUGS planted into an in-launch reduction (`run` at <= 16 tokens) must fail `check_split_launch`."""
    from parity.optimized.ops.triton import _gemm_common as common

    if bug == "a chunk skipped":
        # a last program that left out chunk j would store bf16 of the other chunks' sum: never what the check wants
        ws, out = check_split_launch(run, monkeypatch, n_chunks)
        for j in range(n_chunks):
            skipped = sum((ws[c] for c in range(n_chunks) if c != j), torch.zeros_like(ws[0]))
            assert not torch.equal(out, skipped.to(torch.bfloat16))
        return
    # counters that start at 1 (a launch stopped after one program counted) make a program other than the last one
    # reduce; counters left at n_chunks by a launch that did not reset them make no program reduce
    planted = torch.full((1024,), 1 if bug.startswith("stale") else n_chunks, dtype=torch.int32, device=device)
    monkeypatch.setattr(common, "tile_counters", lambda device, tiles: planted)
    with pytest.raises(AssertionError):
        check_split_launch(run, monkeypatch, n_chunks)
    assert planted.any()  # and the counters are not back to zero

"""fp8_gemm: FP8 x FP8 block-scaled GEMM, C[T, N] = A[T, K] . B[N, K]^T, bf16 out.

Twin: `parity.reference.kernels.fp8_gemm` behind `ref.linear` (act_quant per 128 first), as a reference `Linear`
runs it on one request's `[1, s, K]` activations. The op docstring promises row independence: a token's row is
computed alone, whatever batch it sits in. The kernels allocate their output in torch's default dtype, so every
call runs under `default_dtype(torch.bfloat16)` as the reference model does. act_quant is the torch one here (it is
another op); the backends under test only see its outputs. Backends that are not bitwise are judged by
`gemm_check.check_gemm`: the twin's error to the float64 block math plus the FP8 block-product allowance.
"""

import itertools

import pytest
import torch

from parity.formats import e8m0_to_float, quantize_fp8_blocks
from parity.optimized.ops import OpsConfig, resolve_ops
from parity.reference import model as ref
from tests.optimized.ops.gemm_check import (
    SPLIT_BUGS,
    check_gemm,
    check_planted_split_bug,
    check_split_launch,
    fp8_block_allowance,
    fp32_sum_allowance,
)

OP = "fp8_gemm"
OPS = resolve_ops()  # act_quant (torch)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
FMT, SDTYPE = "ue8m0", torch.float8_e8m0fnu  # the tiny/shipped policy (scale_dtype "fp8")

# model linears of the tiny checkpoint (FP8, e8m0 block scales): wq_a 256 -> 128, wq_b 128 -> 512, wo_b 256 -> 256;
# synthetic weights: N = 192 with fp32 scales (ModelArgs scale_dtype "fp32"), and K = 1536 (12 K blocks: the fp32
# sum is grouped in 6 chunks of 2 blocks)
WEIGHTS = ("attn.wq_a", "attn.wq_b", "attn.wo_b", "synthetic-192x256-fp32", "synthetic-96x1536")
CASES = [
    ((1,), "attn.wq_a"),
    ((2,), "attn.wq_b"),
    ((5,), "attn.wo_b"),
    ((7,), "synthetic-96x1536"),
    ((37,), "synthetic-192x256-fp32"),
    ((63,), "attn.wq_a"),
    ((64,), "attn.wq_b"),
    ((129,), "attn.wo_b"),
    ((1000,), "attn.wq_a"),
    ((1, 2, 5), "attn.wq_b"),
    ((37, 1, 63), "attn.wq_a"),
    ((2, 5, 1, 3), "synthetic-192x256-fp32"),
    ((1, 1, 1), "attn.wo_b"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def synthetic(n, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return quantize_fp8_blocks(torch.randn(n, k, generator=g) * k**-0.5)


def weight(ref_model, name):
    """(weight, scale, scale_fmt, scale_dtype) of a reference FP8 Linear or of a synthetic weight, on DEV."""
    if name == "synthetic-192x256-fp32":
        w, s = synthetic(192, 256)
        return w.to(DEV), e8m0_to_float(s).contiguous().to(DEV), None, torch.float32  # scale_dtype="fp32" policy
    if name == "synthetic-96x1536":
        w, s = synthetic(96, 1536)
        return w.to(DEV), s.to(DEV), FMT, SDTYPE
    lin = ref_model.layers[2].get_submodule(name)
    assert lin.weight.dtype == torch.float8_e4m3fn
    return lin.weight.to(DEV), lin.scale.to(DEV), lin.scale_fmt, lin.scale_dtype


def activations(t, k):
    return torch.randn(t, k).to(torch.bfloat16).to(DEV)


def quantize(x, fmt, sdtype):
    return OPS.act_quant(x, 128, fmt, sdtype)


def expanded_scales(xs, s, n):
    sa = (e8m0_to_float(xs) if xs.dtype == torch.float8_e8m0fnu else xs).double().repeat_interleave(128, dim=-1)
    sb = (e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s).double()
    return sa, sb.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)


def golden_and_allowance(xq, xs, w, s, backend="torch"):
    """float64 block math (exact products, exact sum) and the kernels' accumulation allowance beyond the twin.
    aiter's kernel is third-party code run as is: in the CPU interpreter its e4m3 `tl.dot` is numpy's fp32 sum of
    the exact products, not our kernels' float64 block dot, so it gets the fp32 summation allowance of a block."""
    sa, sb = expanded_scales(xs, s, w.shape[0])
    a, b = xq.double() * sa, w.double() * sb
    n_kb = w.shape[1] // 128
    abs_sum = a.abs() @ b.abs().T
    allowance = fp8_block_allowance(abs_sum, n_kb, DEV, regrouped=n_kb > 8)
    if backend == "aiter" and DEV == "cpu":
        allowance = allowance + fp32_sum_allowance(abs_sum, 128)
    return a @ b.T, allowance


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, name):
    w, s, fmt, sdtype = weight(ref_model, name)
    cu = cu_of(lengths)
    x = activations(cu[-1], w.shape[1])
    with ref.default_dtype(torch.bfloat16):
        xq, xs = quantize(x, fmt, sdtype)
        out = impl(xq, xs, w, s, sdtype)
        expected = torch.cat([ref.linear(x[None, a:b], w, s, fmt, sdtype)[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], w.shape[0])
    check_gemm(impl, out, expected, *golden_and_allowance(xq, xs, w, s, impl.backend))


@pytest.mark.parametrize("name", ["attn.wq_b", "synthetic-192x256-fp32", "synthetic-96x1536"])
def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model, name):
    # every backend: a row's bits never depend on the batch around it (batch invariance). The Triton kernel keeps
    # it across tile sizes and its split-K decode launch: the accumulation order depends on K only
    w, s, fmt, sdtype = weight(ref_model, name)
    k = w.shape[1]
    a = activations(37, k)
    with ref.default_dtype(torch.bfloat16):
        alone = impl(*quantize(a, fmt, sdtype), w, s, sdtype)
        for before, after in ((5, 1), (0, 63), (129, 0)):
            batch = torch.cat([activations(before, k), a, activations(after, k)])
            assert torch.equal(impl(*quantize(batch, fmt, sdtype), w, s, sdtype)[before : before + 37], alone)


def test_leading_dims_and_default_dtype(impl, ref_model):
    # `[..., K]` activations keep their leading dims; the output takes torch's default dtype like the official kernel
    w, s, fmt, sdtype = weight(ref_model, "attn.wq_a")
    x = activations(6, 256).view(2, 3, 256)
    xq, xs = quantize(x, fmt, sdtype)
    with ref.default_dtype(torch.bfloat16):
        bf = impl(xq, xs, w, s, sdtype)
    out = impl(xq, xs, w, s, sdtype)  # default dtype fp32 here: bf16 values widened
    assert bf.shape == (2, 3, 128) and bf.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert torch.equal(out, bf.float())


# ---- planted bugs: each must fail the comparison --------------------------------------------------------------


def planted_inputs(ref_model):
    w, s, fmt, sdtype = weight(ref_model, "attn.wo_b")  # K = 256: two K blocks, e8m0 scales
    x = activations(63, 256)
    with ref.default_dtype(torch.bfloat16):
        xq, xs = quantize(x, fmt, sdtype)
        expected = ref.linear(x[None], w, s, fmt, sdtype)[0]
    return xq, xs, w, s, expected


@pytest.mark.parametrize("bug", ["wrong scale exponent", "dropped block scale", "off-by-one scale group"])
def test_planted_scale_bugs_are_caught(impl, ref_model, bug):
    # the kernel run on the scales a buggy kernel would read: one weight block's exponent one too high, one block's
    # scale dropped (read as 1.0), the activation scales of K block k taken from block k+1
    xq, xs, w, s, expected = planted_inputs(ref_model)
    golden, allowance = golden_and_allowance(xq, xs, w, s, impl.backend)
    s_bug, xs_bug = s.view(torch.uint8).clone(), xs
    if bug == "wrong scale exponent":
        s_bug[1, 0] += 1
    elif bug == "dropped block scale":
        s_bug[0, 1] = 127
    else:
        xs_bug = xs.view(torch.uint8).roll(1, dims=1).view(xs.dtype)
    with ref.default_dtype(torch.bfloat16):
        buggy = impl(xq, xs_bug, w, s_bug.view(s.dtype), SDTYPE)
    with pytest.raises(AssertionError):
        check_gemm(impl, buggy, expected, golden, allowance)


def test_planted_bug_bf16_partial_sums_are_caught(impl, ref_model):
    # a kernel that keeps its accumulator in bf16 between the 128-wide K blocks must fail the comparison (K = 1536:
    # twelve roundings to bf16 add up beyond one ulp)
    if impl.backend != "torch" and DEV == "cuda":
        pytest.skip(
            "on the GPU the stated tolerance admits FP8 MMA block errors up to 2^-12 of the terms' absolute sum, "
            "as large as a bf16 rounding of a partial sum; the other planted bugs stay visible there"
        )
    w, s, fmt, sdtype = weight(ref_model, "synthetic-96x1536")
    x = activations(63, 1536)
    with ref.default_dtype(torch.bfloat16):
        xq, xs = quantize(x, fmt, sdtype)
        expected = ref.linear(x[None], w, s, fmt, sdtype)[0]
    sa, sb = e8m0_to_float(xs), e8m0_to_float(s).repeat_interleave(128, dim=0)[: w.shape[0]]
    acc = torch.zeros(63, w.shape[0], dtype=torch.bfloat16, device=DEV)
    for kb in range(12):
        blk = slice(kb * 128, (kb + 1) * 128)
        p = (xq[:, blk].double() @ w[:, blk].double().T).float()
        acc = (acc.float() + p * (sa[:, kb, None] * sb[None, :, kb])).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        check_gemm(impl, acc, expected, *golden_and_allowance(xq, xs, w, s, impl.backend))


# ---- the Triton kernel's own paths ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_fp8():
    resolve_ops(OpsConfig(overrides=(("fp8_gemm", "triton"),)))  # sets the backend up (interpreter on CPU)
    from parity.optimized.ops.triton import fp8_gemm as module

    return module


@pytest.mark.parametrize(("m", "name"), [(1, "synthetic-96x1536"), (7, "synthetic-96x1536"), (64, "attn.wo_b")])
def test_triton_split_k_gives_the_same_bits(triton_fp8, ref_model, m, name):
    # the split-K launch (one program per K chunk, chunk sums added in order by the tile's last program) and the
    # one-program K loop follow the same K-only chunk order, so the small-M split never changes a bit
    w, s, fmt, sdtype = weight(ref_model, name)
    xq, xs = quantize(activations(m, w.shape[1]), fmt, sdtype)
    with ref.default_dtype(torch.bfloat16):
        whole = triton_fp8.fp8_gemm(xq, xs, w, s, sdtype, _split=False)
        split = triton_fp8.fp8_gemm(xq, xs, w, s, sdtype, _split=True)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("name", ["attn.wo_b", "synthetic-96x1536"])
def test_triton_e8m0_and_fp32_scales_give_the_same_bits(triton_fp8, ref_model, name):
    # e8m0 scales take the fma form (exact products), fp32 ones the twin's multiply-then-add: the same bits, with K
    # in one chunk per block (wo_b, K 256) and in chunks of two blocks (K 1536)
    w, s, fmt, sdtype = weight(ref_model, name)
    assert s.dtype == torch.float8_e8m0fnu, "the fma form needs e8m0 weight scales"
    xq, xs = quantize(activations(37, w.shape[1]), fmt, sdtype)
    with ref.default_dtype(torch.bfloat16):
        e8 = triton_fp8.fp8_gemm(xq, xs, w, s, sdtype)
        f32 = triton_fp8.fp8_gemm(xq, e8m0_to_float(xs), w, e8m0_to_float(s), torch.float32)
    assert torch.equal(e8, f32)


@pytest.mark.parametrize(("m", "name"), [(1, "attn.wq_b"), (129, "synthetic-96x1536")])
def test_triton_fused_act_quant_equals_act_quant_then_gemm(triton_fp8, ref_model, m, name):
    w, s, fmt, sdtype = weight(ref_model, name)
    x = activations(m, w.shape[1]) * 7
    x[0, :128] = 0  # an all-zero group: the 1e-4 amax floor
    with ref.default_dtype(torch.bfloat16):
        fused = triton_fp8.fp8_linear(x, w, s)
        assert torch.equal(fused, triton_fp8.fp8_gemm(*quantize(x, fmt, sdtype), w, s, sdtype))


@pytest.mark.parametrize("split", [False, True])
def test_triton_writes_every_output(triton_fp8, ref_model, monkeypatch, split):
    # outputs (and split-K chunk buffers) start as NaN: an element or chunk the kernel skips would show
    from parity.optimized.ops.triton import _gemm_common

    w, s, fmt, sdtype = weight(ref_model, "synthetic-96x1536")
    xq, xs = quantize(activations(129, 1536), fmt, sdtype)
    with ref.default_dtype(torch.bfloat16):
        clean = triton_fp8.fp8_gemm(xq, xs, w, s, sdtype, _split=split)
        monkeypatch.setattr(_gemm_common, "POISON", True)
        poisoned = triton_fp8.fp8_gemm(xq, xs, w, s, sdtype, _split=split)
    assert not poisoned.isnan().any()
    assert torch.equal(poisoned, clean)


# ---- split-K: the chunk sums added by the last program of each output tile, in the same launch -----------------


def split_inputs(m):
    # N = 320: three 128-row tiles in the interpreter (two at m = 300: two token tiles); K = 1536: 12 K blocks in 6
    # chunks of 2, one program each
    w, s = synthetic(320, 1536, seed=3)
    xq, xs = quantize(activations(m, 1536), FMT, SDTYPE)
    return xq, xs, w.to(DEV), s.to(DEV)


def split_run(module, xq, xs, w, s):
    """The op on these inputs with K split (True) or not."""
    return lambda split: module.fp8_gemm(xq, xs, w, s, SDTYPE, _split=split)


@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_triton_split_k_adds_the_chunk_sums_in_order(triton_fp8, monkeypatch, m):
    check_split_launch(split_run(triton_fp8, *split_inputs(m)), monkeypatch, 6)


@pytest.mark.parametrize("bug", SPLIT_BUGS)
def test_planted_split_k_reduction_bugs_are_caught(triton_fp8, monkeypatch, bug):
    xq, xs, w, s = split_inputs(7)
    check_planted_split_bug(split_run(triton_fp8, xq, xs, w, s), monkeypatch, 6, bug, xq.device)

"""fp8_gemm: FP8 x FP8 block-scaled GEMM, C[T, N] = A[T, K] . B[N, K]^T, bf16 out.

Twin: `parity.reference.kernels.fp8_gemm` behind `ref.linear` (act_quant per 128 first), as a reference `Linear`
runs it on one request's `[1, s, K]` activations. The op docstring promises row independence: a token's row is
computed alone, whatever batch it sits in. The kernels allocate their output in torch's default dtype, so every
call runs under `default_dtype(torch.bfloat16)` as the reference model does.
"""

import itertools

import pytest
import torch

from parity.formats import e8m0_to_float, quantize_fp8_blocks
from parity.optimized.ops import resolve_ops
from parity.reference import model as ref

OPS = resolve_ops()
FMT, SDTYPE = "ue8m0", torch.float8_e8m0fnu  # the tiny/shipped policy (scale_dtype "fp8")

# model linears of the tiny checkpoint (FP8, e8m0 block scales), plus a synthetic N=192 weight with fp32 scales
WEIGHTS = ("attn.wq_a", "attn.wq_b", "attn.wo_b", "synthetic-192x256-fp32")
CASES = [
    ((1,), "attn.wq_a"),
    ((2,), "attn.wq_b"),
    ((5,), "attn.wo_b"),
    ((37,), "synthetic-192x256-fp32"),
    ((63,), "attn.wq_a"),
    ((129,), "attn.wo_b"),
    ((1, 2, 5), "attn.wq_b"),
    ((37, 1, 63), "attn.wq_a"),
    ((2, 5, 1, 3), "synthetic-192x256-fp32"),
    ((1, 1, 1), "attn.wo_b"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def weight(ref_model, name):
    """(weight, scale, scale_fmt, scale_dtype) of a reference FP8 Linear or of the synthetic fp32-scale weight."""
    if name.startswith("synthetic"):
        g = torch.Generator().manual_seed(1)
        w, s = quantize_fp8_blocks(torch.randn(192, 256, generator=g) * 256**-0.5)
        return w, e8m0_to_float(s).contiguous(), None, torch.float32  # the ModelArgs scale_dtype="fp32" policy
    lin = ref_model.layers[2].get_submodule(name)
    assert lin.weight.dtype == torch.float8_e4m3fn
    return lin.weight, lin.scale, lin.scale_fmt, lin.scale_dtype


def gemm(x, w, s, fmt, sdtype):
    xq, xs = OPS.act_quant(x, 128, fmt, sdtype)
    return OPS.fp8_gemm(xq, xs, w, s, sdtype)


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, name):
    w, s, fmt, sdtype = weight(ref_model, name)
    cu = cu_of(lengths)
    x = torch.randn(cu[-1], w.shape[1]).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        out = gemm(x, w, s, fmt, sdtype)
        expected = torch.cat([ref.linear(x[None, a:b], w, s, fmt, sdtype)[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], w.shape[0])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", WEIGHTS)
def test_rows_do_not_depend_on_batchmates_or_position(ref_model, name):
    w, s, fmt, sdtype = weight(ref_model, name)
    k = w.shape[1]
    a = torch.randn(37, k).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        alone = gemm(a, w, s, fmt, sdtype)
        for before, after in ((5, 1), (0, 63), (129, 0)):
            batch = torch.cat([torch.randn(before, k), a.float(), torch.randn(after, k)]).to(torch.bfloat16)
            assert torch.equal(gemm(batch, w, s, fmt, sdtype)[before : before + 37], alone)


def test_planted_bug_bf16_partial_sums_are_caught(ref_model):
    # a kernel that keeps its accumulator in bf16 between the 128-wide K blocks must fail the comparison
    w, s, fmt, sdtype = weight(ref_model, "attn.wo_b")  # K = 256: two K blocks
    x = torch.randn(63, 256).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        expected = gemm(x, w, s, fmt, sdtype)
        xq, xs = OPS.act_quant(x, 128, fmt, sdtype)
    sa, sb = e8m0_to_float(xs), e8m0_to_float(s).repeat_interleave(128, dim=0)[: w.shape[0]]
    acc = torch.zeros(63, w.shape[0], dtype=torch.bfloat16)
    for kb in range(2):
        blk = slice(kb * 128, (kb + 1) * 128)
        p = (xq[:, blk].double() @ w[:, blk].double().T).float()
        acc = (acc.float() + p * (sa[:, kb, None] * sb[None, :, kb])).to(torch.bfloat16)
    assert not torch.equal(acc, expected)

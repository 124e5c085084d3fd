"""fp4_gemm: FP8 activation x packed-FP4 weight GEMM with per-32 e8m0 weight scales, bf16 out.

Twin: `parity.reference.kernels.fp4_gemm` behind `ref.linear`, as a routed `ref.Expert` runs it on the tokens
routed to it. The optimized MoE batches every token of a step that picked an expert into one call, so the op must
be row-independent. Calls run under `default_dtype(torch.bfloat16)` (the kernels allocate their output with it).
"""

import itertools

import pytest
import torch

from parity.formats import e8m0_to_float, fp4_to_float, quantize_fp4_groups
from parity.optimized.ops import resolve_ops
from parity.reference import model as ref

OPS = resolve_ops()
FMT, SDTYPE = "ue8m0", torch.float8_e8m0fnu

# routed expert weights of the tiny checkpoint (w1/w3: 256 -> 128, w2: 128 -> 256) and a synthetic N=96 weight
WEIGHTS = ("w1", "w2", "w3", "synthetic-96x256")
CASES = [
    ((1,), "w1"),
    ((2,), "w2"),
    ((5,), "w3"),
    ((37,), "synthetic-96x256"),
    ((63,), "w2"),
    ((129,), "w1"),
    ((1, 2, 5), "w2"),
    ((37, 1, 63), "synthetic-96x256"),
    ((2, 5, 1, 3), "w1"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def weight(ref_model, name):
    if name.startswith("synthetic"):
        g = torch.Generator().manual_seed(1)
        packed, scale = quantize_fp4_groups(torch.randn(96, 256, generator=g) * 256**-0.5)
        return packed.view(torch.float4_e2m1fn_x2), scale
    lin = getattr(ref_model.layers[3].ffn.experts[5], name)
    assert lin.weight.dtype == torch.float4_e2m1fn_x2
    return lin.weight, lin.scale


def gemm(x, w, s):
    xq, xs = OPS.act_quant(x, 128, FMT, SDTYPE)
    return OPS.fp4_gemm(xq, xs, w, s, SDTYPE)


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, name):
    w, s = weight(ref_model, name)
    cu = cu_of(lengths)
    k = w.shape[1] * 2
    x = torch.randn(cu[-1], k).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        out = gemm(x, w, s)
        expected = torch.cat([ref.linear(x[None, a:b], w, s, FMT, SDTYPE)[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], w.shape[0])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name", WEIGHTS)
def test_rows_do_not_depend_on_batchmates_or_position(ref_model, name):
    w, s = weight(ref_model, name)
    k = w.shape[1] * 2
    a = torch.randn(37, k).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        alone = gemm(a, w, s)
        for before, after in ((5, 1), (0, 63), (129, 0)):
            batch = torch.cat([torch.randn(before, k), a.float(), torch.randn(after, k)]).to(torch.bfloat16)
            assert torch.equal(gemm(batch, w, s)[before : before + 37], alone)


def test_planted_bug_bf16_partial_sums_are_caught(ref_model):
    # a kernel that keeps its accumulator in bf16 between the 32-wide K blocks must fail the comparison
    w, s = weight(ref_model, "w1")
    x = torch.randn(63, 256).to(torch.bfloat16)
    with ref.default_dtype(torch.bfloat16):
        expected = gemm(x, w, s)
        xq, xs = OPS.act_quant(x, 128, FMT, SDTYPE)
    wf = fp4_to_float(w.view(torch.uint8)).view(w.shape[0], 256)
    sa, sb = e8m0_to_float(xs), e8m0_to_float(s)
    acc = torch.zeros(63, w.shape[0], dtype=torch.bfloat16)
    for kb in range(256 // 32):
        blk = slice(kb * 32, (kb + 1) * 32)
        p = (xq[:, blk].double() @ wf[:, blk].double().T).float()
        acc = (acc.float() + p * sa[:, kb // 4, None] * sb[None, :, kb]).to(torch.bfloat16)
    assert not torch.equal(acc, expected)

"""moe_experts: grouped MoE experts (tokens sorted by expert, one batched SwiGLU FFN per expert, fp32 accumulation per
token in ascending expert id) plus the shared expert.

Twin: `parity.reference.model.MoE.forward` (its expert loop over `Expert.forward`) on one request's `[1, s, D]`
tokens. The routing comes from the reference gate of each request (moe_gate is tested on its own), so the test
isolates the experts: the op sees every token of the batch that picked an expert in one call, while the reference
expert sees only its request's tokens; the quantized GEMMs are row-independent, so the results must be equal.
The FP4/FP8 kernels allocate their outputs in the default dtype: everything runs under default_dtype(bf16).
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.optimized.ops.moe_experts import ExpertWeights, expert_forward
from parity.reference import model as ref

OPS = resolve_ops()

# layers 0/1 route by hash, 2/3 by score; tiny: 8 FP4 routed experts, top-2, FP8 shared expert, swiglu_limit 10
CASES = [
    ((1,), 0),
    ((2,), 2),
    ((5,), 3),
    ((37,), 1),
    ((63,), 2),
    ((129,), 3),
    ((1, 2, 5), 0),
    ((37, 1, 63), 2),
    ((1, 1, 1, 1, 1), 3),
    ((2, 5, 1, 3, 1), 1),
]
PARAMS = [pytest.param(*c, id="L{}-layer{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def expert_weights(e: ref.Expert) -> ExpertWeights:
    return ExpertWeights(
        (e.w1.weight, e.w1.scale), (e.w2.weight, e.w2.scale), (e.w3.weight, e.w3.scale), e.swiglu_limit
    )


def tokens(t):
    return torch.randn(t, 256).to(torch.bfloat16), torch.randint(0, 1024, (t,))


def route(moe, x, ids, cu):
    outs = [moe.gate(x[a:b], ids[a:b]) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def run(moe, x, weights, indices, policy):
    experts = [expert_weights(e) for e in moe.experts]
    return OPS.moe_experts(x, weights, indices, experts, expert_weights(moe.shared_experts), *policy)


def policy(tiny_args):
    return tiny_args.act_scale_fmt, tiny_args.act_scale_dtype


@pytest.mark.parametrize(("lengths", "layer"), PARAMS)
def test_ragged_matches_reference_moe_per_sequence(ref_model, tiny_args, lengths, layer):
    moe = ref_model.layers[layer].ffn
    cu = cu_of(lengths)
    x, ids = tokens(cu[-1])
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, cu)
        out = run(moe, x, weights, indices, policy(tiny_args))
        expected = torch.cat([moe(x[None, a:b], ids[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("layer", [0, 2])
def test_rows_do_not_depend_on_batchmates_or_position(ref_model, tiny_args, layer):
    moe = ref_model.layers[layer].ffn
    a, a_ids = tokens(37)
    with ref.default_dtype(torch.bfloat16):
        alone = run(moe, a, *route(moe, a, a_ids, (0, 37)), policy(tiny_args))
        for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
            (xb, ib), (xa, ia) = tokens(before), tokens(after)
            x, ids = torch.cat([xb, a, xa]), torch.cat([ib, a_ids, ia])
            cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
            out = run(moe, x, *route(moe, x, ids, cu), policy(tiny_args))
            assert torch.equal(out[before : before + 37], alone)


def test_planted_bug_bf16_accumulation_is_caught(ref_model, tiny_args):
    # a kernel that accumulates the expert outputs in bf16 instead of fp32 must fail the comparison
    moe = ref_model.layers[2].ffn
    x, ids = tokens(63)
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, (0, 63))
        expected = moe(x[None], ids[None])[0]
        buggy = torch.zeros_like(x)
        for e, expert in enumerate(moe.experts):
            rows, slot = torch.where(indices == e)
            if rows.numel():
                buggy[rows] += expert_forward(expert_weights(expert), x[rows], weights[rows, slot, None], fmt, sdtype)
        buggy += expert_forward(expert_weights(moe.shared_experts), x, None, fmt, sdtype)
    assert torch.equal(run(moe, x, weights, indices, (fmt, sdtype)), expected)
    assert not torch.equal(buggy, expected)

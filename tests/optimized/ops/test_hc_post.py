"""hc_post: mHC post-mix, new[k] = post[k] * x + sum_j comb[j, k] * residual[j] per token, fp32 then bf16.

Twin: `parity.reference.model.Block.hc_post` on one request's `[1, s, D]` sublayer output, `[1, s, hc, D]`
residual and its `[1, s, hc]` / `[1, s, hc, hc]` weights. No segments: every token is mixed alone.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops

OPS = resolve_ops()

CASES = [(1,), (2,), (5,), (37,), (63,), (129,), (1, 2, 5), (37, 1, 63), (2, 5, 1, 3, 1)]
PARAMS = [pytest.param(c, id="L{}".format("_".join(map(str, c)))) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def operands(block, t):
    """Sublayer output, residual streams, and the post/comb weights hc_pre derives from those streams."""
    residual = torch.randn(t, 4, 256).to(torch.bfloat16)
    fn, scale, base = block.hc_attn_fn, block.hc_attn_scale, block.hc_attn_base
    _, post, comb = OPS.hc_pre(
        residual, fn, scale, base, (0, t), block.norm_eps, block.hc_mult, block.hc_sinkhorn_iters, block.hc_eps
    )
    return torch.randn(t, 256).to(torch.bfloat16), residual, post, comb


@pytest.mark.parametrize("lengths", PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths):
    block = ref_model.layers[1]
    cu = cu_of(lengths)
    x, residual, post, comb = operands(block, cu[-1])
    out = OPS.hc_post(x, residual, post, comb)
    expected = torch.cat(
        [
            block.hc_post(x[None, a:b], residual[None, a:b], post[None, a:b], comb[None, a:b])[0]
            for a, b in zip(cu[:-1], cu[1:])
        ]
    )
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], 4, 256)
    assert torch.equal(out, expected)


def test_rows_do_not_depend_on_batchmates_or_position(ref_model):
    block = ref_model.layers[1]
    a = operands(block, 37)
    alone = OPS.hc_post(*a)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        parts = [operands(block, before), a, operands(block, after)]
        batch = [torch.cat(ts) for ts in zip(*parts)]
        assert torch.equal(OPS.hc_post(*batch)[before : before + 37], alone)


def test_planted_bug_bf16_mixing_is_caught(ref_model):
    # a kernel that mixes in bf16 (weights rounded, bf16 products and sum) must fail the comparison
    x, residual, post, comb = operands(ref_model.layers[1], 63)
    bf = torch.bfloat16
    mixed = torch.sum(comb.to(bf).unsqueeze(-1) * residual.unsqueeze(-2), dim=1)
    buggy = post.to(bf).unsqueeze(-1) * x.unsqueeze(-2) + mixed
    assert not torch.equal(buggy, OPS.hc_post(x, residual, post, comb))

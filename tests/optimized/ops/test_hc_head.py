"""hc_head: collapse the final hc streams with sigmoid weights (before the final norm and the logits).

Twin: `parity.reference.model.ParallelHead.hc_head` on one request's `[1, s, hc, D]` streams (main head: the
Transformer's hc_head_* parameters; MTP head: the MTP block's). The op runs one request at a time so the fp32 mixer
GEMM and the vectorized sigmoid see the reference's shapes.

No one-segment break is asserted here: measured on this CPU, running the whole batch as one request changes the fp32
mixes (gemv vs gemm) but the difference reaches the bf16 output only rarely (0 to 5 of ~10k elements depending on
the seed), so such a check would not be robust.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops

OPS = resolve_ops()

CASES = [
    ((1,), "main"),
    ((2,), "mtp"),
    ((5,), "main"),
    ((37,), "mtp"),
    ((63,), "main"),
    ((129,), "main"),
    ((1, 2, 5), "mtp"),
    ((37, 1, 63), "main"),
    ((1, 1, 1, 1, 1), "main"),
    ((2, 5, 1, 3, 1), "mtp"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def streams(t):
    return torch.randn(t, 4, 256).to(torch.bfloat16)


def params(model, which):
    owner = model if which == "main" else model.mtp[0]
    return owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base


def run(model, which, x, cu):
    return OPS.hc_head(x, *params(model, which), cu, model.head.norm_eps, model.head.hc_eps)


def reference_per_sequence(model, which, x, cu):
    return torch.cat([model.head.hc_head(x[None, a:b], *params(model, which))[0] for a, b in zip(cu[:-1], cu[1:])])


@pytest.mark.parametrize(("lengths", "which"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, which):
    cu = cu_of(lengths)
    x = streams(cu[-1])
    out = run(ref_model, which, x, cu)
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], 256)
    assert torch.equal(out, reference_per_sequence(ref_model, which, x, cu))


def test_segments_do_not_depend_on_batchmates_or_position(ref_model):
    a = streams(37)
    alone = run(ref_model, "main", a, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        x = torch.cat([streams(before), a, streams(after)])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        assert torch.equal(run(ref_model, "main", x, cu)[before : before + 37], alone)


def test_planted_bug_bf16_collapse_is_caught(ref_model):
    # a kernel that rounds the sigmoid weights to bf16 and sums the streams in bf16 must fail the comparison
    x = streams(63)
    fn, scale, base = params(ref_model, "main")
    xf = x.flatten(1).float()
    mixes = torch.nn.functional.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + ref_model.norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + ref_model.hc_eps
    buggy = torch.sum(pre.to(torch.bfloat16).unsqueeze(-1) * x, dim=1)
    assert not torch.equal(buggy, run(ref_model, "main", x, (0, 63)))

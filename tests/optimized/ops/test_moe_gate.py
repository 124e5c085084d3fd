"""moe_gate: MoE routing, scores, expert choice (top-k with bias, or the token-id hash table), weights.

Twin: `parity.reference.model.Gate.forward` on one request's `[s, D]` tokens (ref.MoE flattens `[1, s, D]`). The op
docstring: run per request so the fp32 score GEMM and the vectorized softplus see the reference's shapes; the
planted-bug test shows that one segment for the whole batch changes the weights wherever the machine's GEMM rounds by
row count (measured per run). The Triton backend ignores the segments (each token is scored and routed alone) and is
judged by `check_route`: weights within the float64 math's propagated error bound, expert ids equal except at
near ties (two biased scores closer than that bound, where either choice is a correct top-k).
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from parity.optimized.ops import resolve_ops
from parity.reference.model import route
from tests.optimized.ops.conftest import DEVICES, skip_unless_batch_changes_bits
from tests.optimized.ops.gemm_check import check_gemm, fp32_sum_allowance

OP = "moe_gate"
OPS = resolve_ops()  # the torch backend, for the segment test of its own design
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# layers 0 and 1 of tiny route by hash (n_hash_layers 2), layers 2 and 3 by score top-k with bias
CASES = [
    ((1,), 0),
    ((2,), 2),
    ((5,), 3),
    ((37,), 1),
    ((63,), 2),
    ((129,), 0),
    ((1, 2, 5), 3),
    ((37, 1, 63), 2),
    ((1, 1, 1, 1, 1), 1),
    ((2, 5, 1, 3, 1), 3),
    ((7,), 2),
    ((64,), 3),
    ((1000,), 2),
]
PARAMS = [pytest.param(*c, id="L{}-layer{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def tokens(t, vocab=1024):
    return torch.randn(t, 256).to(torch.bfloat16).to(DEV), torch.randint(0, vocab, (t,)).to(DEV)


def params(gate):
    """The gate's tensors on DEV."""
    tid2eid = gate.tid2eid.to(DEV) if gate.hash else None
    return gate.weight.detach().to(DEV), None if gate.bias is None else gate.bias.detach().to(DEV), tid2eid


def run(impl, gate, x, ids, cu, score_func=None, bias=..., route_scale=None):
    weight, b, tid2eid = params(gate)
    b = b if bias is ... else bias
    func, scale = score_func or gate.score_func, gate.route_scale if route_scale is None else route_scale
    return impl(x, weight, b, tid2eid, ids, gate.topk, func, scale, cu)


def reference_per_sequence(gate, x, ids, cu, score_func=None):
    weight, bias, tid2eid = params(gate)
    func = score_func or gate.score_func
    outs = [
        route(x[a:b], weight, bias, tid2eid, ids[a:b], gate.topk, func, gate.route_scale)
        for a, b in zip(cu[:-1], cu[1:])
    ]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def check_route(impl, got, want, gate, x, score_func=None):
    """Bitwise backends: both outputs equal. Others: expert ids equal to the twin's, or a correct top-k of the
    float64 biased scores within their error bound (near ties); weights within the bound of the float64 route
    math for the ids the backend chose (judged against the twin's weights where the ids agree)."""
    (gw, gi), (rw, ri) = got, want
    assert gw.dtype == rw.dtype and gw.shape == rw.shape and gi.dtype == ri.dtype and gi.shape == ri.shape
    if impl.bitwise:
        assert torch.equal(gi, ri) and torch.equal(gw, rw)
        return
    weight, bias, tid2eid = params(gate)
    func = score_func or gate.score_func
    xd, wd = x.double(), weight.double()
    sc = xd @ wd.T
    dsc = fp32_sum_allowance(xd.abs() @ wd.abs().T, x.shape[1])  # both orders, the twin's included
    if func == "softmax":
        s = sc.softmax(-1)
        ds = 2 * s * dsc.amax(-1, keepdim=True)
    elif func == "sigmoid":
        s, ds = sc.sigmoid(), 0.25 * dsc
    else:
        s, ds = F.softplus(sc).sqrt(), 0.5 * dsc  # d/dx sqrt(softplus(x)) < 0.5
    ds = ds + 2.0**-20 * s.abs()  # exp / log / sqrt / division ulps of both sides
    if tid2eid is not None:
        assert torch.equal(gi, ri), "hash routing: the table decides"
    else:
        sel = s + (bias.double() if bias is not None else 0.0)
        dsel = ds + 2.0**-23 * sel.abs()
        hi, lo = sel + dsel, sel - dsel
        chosen = hi.gather(1, gi.long())
        rest = lo.scatter(1, gi.long(), float("-inf"))
        assert bool((chosen.amin(1) >= rest.amax(1)).all()), "an expert outside a near tie was left out"
        ordered = chosen[:, :-1] >= lo.gather(1, gi.long())[:, 1:]
        assert bool(ordered.all()), "top-k out of order beyond a near tie"
    sg, dg = s.gather(1, gi.long()), ds.gather(1, gi.long())
    if func != "softmax":
        tot, dtot = sg.sum(-1, keepdim=True), dg.sum(-1, keepdim=True)
        golden, allow = sg / tot, dg / tot + sg * dtot / tot**2
    else:
        golden, allow = sg, dg
    golden, allow = golden * gate.route_scale, (allow + 2.0**-21 * golden.abs()) * gate.route_scale
    same = (gi == ri).all(-1)
    check_gemm(impl, gw[same], rw[same], golden[same], allow[same])
    assert bool(((gw[~same].double() - golden[~same]).abs() <= allow[~same]).all()), "weights at a near tie"


@pytest.mark.parametrize(("lengths", "layer"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, layer):
    gate = ref_model.layers[layer].ffn.gate
    assert gate.hash == (layer < 2)
    cu = cu_of(lengths)
    x, ids = tokens(cu[-1])
    weights, indices = run(impl, gate, x, ids, cu)
    rw, ri = reference_per_sequence(gate, x, ids, cu)
    assert weights.dtype == torch.float32 and weights.shape == (cu[-1], gate.topk)
    check_route(impl, (weights, indices), (rw, ri), gate, x)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("layer", [0, 2])
def test_other_score_funcs(impl, ref_model, layer, score_func):
    gate = ref_model.layers[layer].ffn.gate
    cu = cu_of((37, 1, 5))
    x, ids = tokens(cu[-1])
    got = run(impl, gate, x, ids, cu, score_func)
    check_route(impl, got, reference_per_sequence(gate, x, ids, cu, score_func), gate, x, score_func)


@pytest.mark.parametrize("layer", [0, 2])
def test_segments_do_not_depend_on_batchmates_or_position(impl, ref_model, layer):
    gate = ref_model.layers[layer].ffn.gate
    a, a_ids = tokens(37)
    alone = run(impl, gate, a, a_ids, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        (xb, ib), (xa, ia) = tokens(before), tokens(after)
        x, ids = torch.cat([xb, a, xa]), torch.cat([ib, a_ids, ia])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        for got, want in zip(run(impl, gate, x, ids, cu), alone):
            assert torch.equal(got[before : before + 37], want)


@pytest.mark.parametrize("bug", ["bias dropped from the choice", "route scale applied twice", "off-by-one expert"])
def test_planted_routing_bugs_are_caught(impl, ref_model, bug):
    # the comparison must reject what a buggy kernel would return: top-k on the unbiased scores, the route scale
    # multiplied in twice, every score read from the next expert's weight row
    gate = ref_model.layers[3].ffn.gate
    x, ids = tokens(63)
    want = reference_per_sequence(gate, x, ids, (0, 63))
    if bug == "bias dropped from the choice":
        got = run(impl, gate, x, ids, (0, 63), bias=None)
    elif bug == "route scale applied twice":
        got = run(impl, gate, x, ids, (0, 63), route_scale=gate.route_scale**2)
    else:
        weight, bias, _ = params(gate)
        got = impl(x, weight.roll(1, dims=0), bias, None, ids, gate.topk, gate.score_func, gate.route_scale, (0, 63))
    with pytest.raises(AssertionError):
        check_route(impl, got, want, gate, x)


def run_torch(gate, x, ids, cu):
    tid2eid = gate.tid2eid if gate.hash else None
    return OPS.moe_gate(x, gate.weight, gate.bias, tid2eid, ids, gate.topk, gate.score_func, gate.route_scale, cu)


def reference_torch(gate, x, ids, cu):
    outs = [gate(x[a:b], ids[a:b]) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 2])
def test_planted_bug_one_segment_for_the_batch_is_not_bitwise(ref_model, layer, device):
    # the torch backend's design (one gate call per request; the Triton backend has no segments to merge):
    # 40 one-token requests (a decode batch): where the machine's fp32 GEMM rounds by row count (measured first),
    # one gate call over all of them changes the weights (the expert choice may survive, so only weights are asserted)
    gate = copy.deepcopy(ref_model.layers[layer].ffn.gate).to(device)
    cu = tuple(range(41))
    x, ids = (t.to(device) for t in tokens(40))
    rw, _ = reference_torch(gate, x, ids, cu)
    assert torch.equal(run_torch(gate, x, ids, cu)[0], rw)
    skip_unless_batch_changes_bits(rw, reference_torch(gate, x, ids, (0, 40))[0], "moe_gate")
    assert not torch.equal(run_torch(gate, x, ids, (0, 40))[0], rw)


@pytest.mark.parametrize("layer", [0, 2])
def test_triton_writes_every_output(ref_model, monkeypatch, layer):
    # weights start as NaN and ids as -1 (0xFF bytes): a token or slot the kernels skip would show
    from parity.optimized.ops import OpsConfig
    from parity.optimized.ops.triton import _gemm_common

    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    gate = ref_model.layers[layer].ffn.gate
    x, ids = tokens(70)
    weight, bias, tid2eid = params(gate)
    args = (x, weight, bias, tid2eid, ids, gate.topk, gate.score_func, gate.route_scale, (0, 70))
    clean = ops.moe_gate(*args)
    monkeypatch.setattr(_gemm_common, "POISON", True)
    poisoned = ops.moe_gate(*args)
    assert not poisoned[0].isnan().any()
    assert torch.equal(poisoned[0], clean[0]) and torch.equal(poisoned[1], clean[1])

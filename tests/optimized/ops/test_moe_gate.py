"""moe_gate: MoE routing, scores, expert choice (top-k with bias, or the token-id hash table), weights.

Twin: `parity.reference.model.Gate.forward` on one request's `[s, D]` tokens (ref.MoE flattens `[1, s, D]`). The op
docstring: run per request so the fp32 score GEMM and the vectorized softplus see the reference's shapes; the
planted-bug test shows that one segment for the whole batch changes the weights wherever the machine's GEMM rounds by
row count (measured per run).
"""

import copy
import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from tests.optimized.ops.conftest import DEVICES, skip_unless_batch_changes_bits

OPS = resolve_ops()

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
]
PARAMS = [pytest.param(*c, id="L{}-layer{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def tokens(t, vocab=1024):
    return torch.randn(t, 256).to(torch.bfloat16), torch.randint(0, vocab, (t,))


def run(gate, x, ids, cu):
    tid2eid = gate.tid2eid if gate.hash else None
    return OPS.moe_gate(x, gate.weight, gate.bias, tid2eid, ids, gate.topk, gate.score_func, gate.route_scale, cu)


def reference_per_sequence(gate, x, ids, cu):
    outs = [gate(x[a:b], ids[a:b]) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


@pytest.mark.parametrize(("lengths", "layer"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, layer):
    gate = ref_model.layers[layer].ffn.gate
    assert gate.hash == (layer < 2)
    cu = cu_of(lengths)
    x, ids = tokens(cu[-1])
    weights, indices = run(gate, x, ids, cu)
    rw, ri = reference_per_sequence(gate, x, ids, cu)
    assert weights.dtype == torch.float32 and weights.shape == (cu[-1], gate.topk)
    assert indices.dtype == ri.dtype
    assert torch.equal(indices, ri)
    assert torch.equal(weights, rw)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("layer", [0, 2])
def test_other_score_funcs(ref_model, monkeypatch, layer, score_func):
    gate = ref_model.layers[layer].ffn.gate
    monkeypatch.setattr(gate, "score_func", score_func)
    cu = cu_of((37, 1, 5))
    x, ids = tokens(cu[-1])
    for got, want in zip(run(gate, x, ids, cu), reference_per_sequence(gate, x, ids, cu)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layer", [0, 2])
def test_segments_do_not_depend_on_batchmates_or_position(ref_model, layer):
    gate = ref_model.layers[layer].ffn.gate
    a, a_ids = tokens(37)
    alone = run(gate, a, a_ids, (0, 37))
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1)):
        (xb, ib), (xa, ia) = tokens(before), tokens(after)
        x, ids = torch.cat([xb, a, xa]), torch.cat([ib, a_ids, ia])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        for got, want in zip(run(gate, x, ids, cu), alone):
            assert torch.equal(got[before : before + 37], want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 2])
def test_planted_bug_one_segment_for_the_batch_is_not_bitwise(ref_model, layer, device):
    # 40 one-token requests (a decode batch): where the machine's fp32 GEMM rounds by row count (measured first),
    # one gate call over all of them changes the weights (the expert choice may survive, so only weights are asserted)
    gate = copy.deepcopy(ref_model.layers[layer].ffn.gate).to(device)
    cu = tuple(range(41))
    x, ids = (t.to(device) for t in tokens(40))
    rw, _ = reference_per_sequence(gate, x, ids, cu)
    assert torch.equal(run(gate, x, ids, cu)[0], rw)
    skip_unless_batch_changes_bits(rw, reference_per_sequence(gate, x, ids, (0, 40))[0], "moe_gate")
    assert not torch.equal(run(gate, x, ids, (0, 40))[0], rw)

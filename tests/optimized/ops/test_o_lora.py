"""o_lora: grouped output LoRA (wo_a), per group g `o[T, g, :] . wo_a[g]^T` in bf16.

Twin: `parity.reference.model.Attention.forward`, `torch.einsum("bsgd,grd->bsgr", o, wo_a.view(g, rank, -1))` on
one request's `[1, s, g, h*d/g]` attention output. The op runs one einsum per segment (cuBLAS picks its bf16
kernel by shape); on CPU rows are independent, so a single segment over the whole batch also matches here.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops

OPS = resolve_ops()

# (groups, rank, h*d): the tiny model's wo_a (2 groups of 2 heads x 128, rank 128) and synthetic layouts
LAYOUTS = {"tiny": (2, 128, 512), "g4-r64": (4, 64, 384), "g1-r32": (1, 32, 192), "g8-r16": (8, 16, 512)}
CASES = [
    ((1,), "tiny"),
    ((2,), "g4-r64"),
    ((5,), "g1-r32"),
    ((37,), "tiny"),
    ((63,), "g8-r16"),
    ((129,), "tiny"),
    ((1, 2, 5), "tiny"),
    ((37, 1, 63), "g4-r64"),
    ((2, 5, 1, 3, 1), "tiny"),
    ((1, 1, 1), "g8-r16"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def weight(ref_model, layout):
    g, rank, hd = LAYOUTS[layout]
    if layout == "tiny":
        attn = ref_model.layers[2].attn
        assert (attn.n_groups, attn.o_lora_rank) == (g, rank)
        return attn.wo_a.weight
    return (torch.randn(g * rank, hd // g) * (hd // g) ** -0.5).to(torch.bfloat16)


def reference(o, wo_a, g, rank):
    # one request: o [s, h*d] -> [1, s, g, h*d/g], as in ref.Attention.forward
    return torch.einsum("bsgd,grd->bsgr", o[None].view(1, o.shape[0], g, -1), wo_a.view(g, rank, -1))[0]


@pytest.mark.parametrize(("lengths", "layout"), PARAMS)
def test_ragged_matches_reference_per_sequence(ref_model, lengths, layout):
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    cu = cu_of(lengths)
    o = torch.randn(cu[-1], hd).to(torch.bfloat16)
    out = OPS.o_lora(o, wo_a, g, rank, cu)
    expected = torch.cat([reference(o[a:b], wo_a, g, rank) for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], g, rank)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("layout", ["tiny", "g8-r16"])
def test_rows_do_not_depend_on_batchmates_or_position(ref_model, layout):
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    a = torch.randn(37, hd).to(torch.bfloat16)
    alone = OPS.o_lora(a, wo_a, g, rank, (0, 37))
    for before, after in ((5, 1), (0, 63), (129, 0), (1, 1)):
        o = torch.cat([torch.randn(before, hd), a.float(), torch.randn(after, hd)]).to(torch.bfloat16)
        n = before + 37 + after
        assert torch.equal(OPS.o_lora(o, wo_a, g, rank, (0, n))[before : before + 37], alone)


def test_planted_bug_transposed_group_weight_is_caught(ref_model):
    # a kernel that reads wo_a as [g, in, rank] (the transposed layout of each group) must fail the comparison
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny")
    o = torch.randn(63, hd).to(torch.bfloat16)
    buggy = torch.einsum("sgd,gdr->sgr", o.view(63, g, -1), wo_a.view(g, -1, rank))
    assert not torch.equal(buggy, reference(o, wo_a, g, rank))
    assert torch.equal(OPS.o_lora(o, wo_a, g, rank, (0, 63)), reference(o, wo_a, g, rank))

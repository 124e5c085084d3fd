"""rms_norm: fp32 `w * (x * rsqrt(mean(x^2) + eps))`, cast back to x's dtype, over the last dim.

Twin: `parity.reference.model.RMSNorm.forward`, on one request's `[1, s, D]` (q_norm, kv_norm, attn/ffn norms,
enorm), `[1, s, hc, D]` (the MTP hnorm on the streams) or `[1, n, d]` (compressor entries). The op takes no
segments: each row is reduced alone, so the flat `[T, ...]` batch must give every request's rows unchanged.
"""

import itertools

import pytest
import torch

from tests.optimized.ops.conftest import check

OP = "rms_norm"

# norm modules of the tiny reference model: name -> dims of one token's input
NORMS = {
    "layers.0.attn.q_norm": (128,),
    "layers.1.attn.kv_norm": (128,),
    "layers.2.attn_norm": (256,),
    "layers.3.ffn_norm": (256,),
    "mtp.0.hnorm": (4, 256),  # [T, hc, D] streams
    "layers.1.attn.compressor.norm": (128,),
}
CASES = [
    ((1,), "layers.0.attn.q_norm"),
    ((2,), "layers.2.attn_norm"),
    ((5,), "mtp.0.hnorm"),
    ((37,), "layers.1.attn.kv_norm"),
    ((63,), "layers.3.ffn_norm"),
    ((129,), "layers.2.attn_norm"),
    ((1, 2, 5), "layers.1.attn.compressor.norm"),
    ((37, 1, 63), "mtp.0.hnorm"),
    ((2, 5, 1, 3), "layers.0.attn.q_norm"),
    ((1, 1, 1), "layers.3.ffn_norm"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def inputs(t, dims):
    return (torch.randn(t, *dims) * 3).to(torch.bfloat16)


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, name):
    norm = ref_model.get_submodule(name)
    cu = cu_of(lengths)
    x = inputs(cu[-1], NORMS[name])
    out = impl(x, norm.weight, norm.eps)
    expected = torch.cat([norm(x[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16
    check(impl, out, expected, golden=golden(x, norm))


def test_fp32_input_stays_fp32(impl, ref_model):
    norm = ref_model.get_submodule("layers.2.attn_norm")
    x = torch.randn(5, 256)
    out = impl(x, norm.weight, norm.eps)
    assert out.dtype == torch.float32
    check(impl, out, norm(x[None])[0], golden=golden(x, norm))


def golden(x, norm):
    # the float64 math of the twin
    xd = x.double()
    return norm.weight.double() * (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize("name", ["layers.2.attn_norm", "mtp.0.hnorm"])
def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model, name):
    # every backend: a row's bits never depend on the batch around it (batch invariance)
    norm = ref_model.get_submodule(name)
    a = inputs(37, NORMS[name])
    alone = impl(a, norm.weight, norm.eps)
    for before, after in ((5, 1), (0, 63), (129, 0), (1, 2)):
        x = torch.cat([inputs(before, NORMS[name]), a, inputs(after, NORMS[name])])
        assert torch.equal(impl(x, norm.weight, norm.eps)[before : before + 37], alone)


def test_planted_bug_weight_after_the_cast_is_caught(impl, ref_model):
    # a fused kernel that rounds the normalized row to bf16 before the weight multiply must fail the comparison
    norm = ref_model.get_submodule("layers.2.attn_norm")
    x = inputs(63, (256,))
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    buggy = (norm.weight.to(torch.bfloat16) * normed).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        check(impl, buggy, impl(x, norm.weight, norm.eps), golden=golden(x, norm))

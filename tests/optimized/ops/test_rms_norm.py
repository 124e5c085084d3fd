"""rms_norm: fp32 `w * (x * rsqrt(mean(x^2) + eps))`, cast back to x's dtype, over the last dim.

Twin: `parity.reference.model.RMSNorm.forward`, on one request's `[1, s, D]` (q_norm, kv_norm, attn/ffn norms,
enorm), `[1, s, hc, D]` (the MTP hnorm on the streams) or `[1, n, d]` (compressor entries). The op takes no
segments: each row is reduced alone, so the flat `[T, ...]` batch must give every request's rows unchanged.

The triton kernel takes the sum of squares and the rsqrt in float64 (its r is rounded once), so it is judged
against the float64 math: within the twin's own error + 1/2 ulp for bf16 outputs, + 3 fp32 ulp for fp32 outputs.
"""

import copy
import itertools

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from tests.optimized.ops.conftest import BackendImpl, check

OP = "rms_norm"
# bf16 outputs: the kernel and the twin both round values within ~1e-7 of the float64 math, so the kernel can be
# further from it than the twin only where that value sits at a rounding midpoint: by less than half an ulp
BF16_ULPS = 0.5

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


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def norm_on(ref_model, name, dev):
    return copy.deepcopy(ref_model.get_submodule(name)).to(dev)


@pytest.mark.parametrize(("lengths", "name"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, name):
    norm = norm_on(ref_model, name, device_of(impl))
    cu = cu_of(lengths)
    x = inputs(cu[-1], NORMS[name]).to(norm.weight.device)
    out = impl(x, norm.weight, norm.eps)
    expected = torch.cat([norm(x[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16
    check(impl, out.cpu(), expected.cpu(), golden=golden(x, norm), ulps=BF16_ULPS)


def test_fp32_input_stays_fp32(impl, ref_model):
    # fp32 output: three fp32 roundings (r, x * r, w * (x * r)) each within half an ulp of its own result; across a
    # binade edge that is up to ~2.5 ulp of the output
    norm = norm_on(ref_model, "layers.2.attn_norm", device_of(impl))
    x = torch.randn(37, 256).to(norm.weight.device)
    out = impl(x, norm.weight, norm.eps)
    assert out.dtype == torch.float32
    check(impl, out.cpu(), norm(x[None])[0].cpu(), golden=golden(x, norm), ulps=3.0)


def golden(x, norm):
    # the float64 math of the twin
    xd = x.cpu().double()
    w = norm.weight.detach().cpu().double()
    return w * (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + norm.eps))


@pytest.mark.parametrize(("t", "d"), [(3, 7168), (2, 10000)], ids=["pro-dim", "chunked-10000"])
def test_wide_rows(impl, t, d):
    # V4-Pro's model dim, and a row longer than the kernel's 8192-column block (its chunked two-pass path)
    dev = device_of(impl)
    norm = ref_model_free_norm(d).to(dev)
    x = inputs(t, (d,)).to(dev)
    check(impl, impl(x, norm.weight, norm.eps).cpu(), norm(x[None])[0].cpu(), golden=golden(x, norm), ulps=BF16_ULPS)


def ref_model_free_norm(d):
    from parity.reference.model import RMSNorm

    norm = RMSNorm(d, 1e-6)
    with torch.no_grad():  # a checkpoint-like weight: 1 + N(0, 0.1^2), on the bf16 grid
        norm.weight.copy_((1 + 0.1 * torch.randn(d)).to(torch.bfloat16).float())
    return norm


def test_output_is_written_everywhere(impl, ref_model):
    # a NaN-poisoned output buffer: an element the kernel does not write stays NaN and fails the comparison
    if impl.backend == "torch":
        pytest.skip("the torch backend allocates its output; it takes no output buffer")
    norm = norm_on(ref_model, "mtp.0.hnorm", device_of(impl))
    x = inputs(63, (4, 256)).to(norm.weight.device)
    out = torch.full_like(x, float("nan"))
    assert impl(x, norm.weight, norm.eps, out=out) is out
    check(impl, out.cpu(), norm(x[None])[0].cpu(), golden=golden(x, norm), ulps=BF16_ULPS)


@pytest.mark.parametrize("name", ["layers.2.attn_norm", "mtp.0.hnorm"])
def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model, name):
    # every backend: a row's bits never depend on the batch around it (batch invariance)
    dev = device_of(impl)
    norm = norm_on(ref_model, name, dev)
    a = inputs(37, NORMS[name]).to(dev)
    alone = impl(a, norm.weight, norm.eps)
    for before, after in ((5, 1), (0, 63), (129, 0), (1, 2), (300, 3)):
        x = torch.cat([inputs(before, NORMS[name]).to(dev), a, inputs(after, NORMS[name]).to(dev)])
        assert torch.equal(impl(x, norm.weight, norm.eps)[before : before + 37], alone)


def test_planted_bug_weight_after_the_cast_is_caught(impl, ref_model):
    # a fused kernel that rounds the normalized row to bf16 before the weight multiply must fail the comparison
    norm = norm_on(ref_model, "layers.2.attn_norm", device_of(impl))
    x = inputs(63, (256,)).to(norm.weight.device)
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm.eps)).to(torch.bfloat16)
    buggy = (norm.weight.to(torch.bfloat16) * normed).to(torch.bfloat16)
    with pytest.raises(AssertionError):
        check(impl, buggy.cpu(), impl(x, norm.weight, norm.eps).cpu(), golden=golden(x, norm), ulps=BF16_ULPS)


def test_planted_bug_mean_over_the_padded_block_is_caught(ref_model):
    # the triton kernel dividing the sum of squares by its block width (1024) instead of the row length (1000)
    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    tri = BackendImpl(OP, "triton", registry()[OP]["triton"], ops.rms_norm)
    from parity.optimized.ops.triton import rms_norm as module

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    norm = ref_model_free_norm(1000).to(dev)
    x = inputs(37, (1000,)).to(dev)
    want, gold = norm(x[None])[0].cpu(), golden(x, norm)
    check(tri, module.launch(x, norm.weight, norm.eps).cpu(), want, golden=gold, ulps=BF16_ULPS)
    with pytest.raises(AssertionError):
        check(tri, module.launch(x, norm.weight, norm.eps, plant=1).cpu(), want, golden=gold, ulps=BF16_ULPS)

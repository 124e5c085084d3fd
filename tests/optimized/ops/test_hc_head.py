"""hc_head: collapse the final hc streams with sigmoid weights (before the final norm and the logits).

Twin: `parity.reference.model.ParallelHead.hc_head` on one request's `[1, s, hc, D]` streams (main head: the
Transformer's hc_head_* parameters; MTP head: the MTP block's). The torch op runs one request at a time so the fp32
mixer GEMM and the vectorized sigmoid see the reference's shapes. The triton kernel mixes every token alone and is
judged against the float64 math: within the twin's own error + 1 bf16 ulp + the fp32 collapse's rounding where the
streams cancel (`golden`).

No one-segment break is asserted here: measured on this CPU, running the whole batch as one request changes the fp32
mixes (gemv vs gemm) but the difference reaches the bf16 output only rarely (0 to 5 of ~10k elements depending on
the seed), so such a check would not be robust.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from tests.optimized.ops.conftest import BackendImpl, check

OP = "hc_head"
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


def streams(t, d=256):
    return torch.randn(t, 4, d).to(torch.bfloat16)


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def params(model, which, dev="cpu"):
    owner = model if which == "main" else model.mtp[0]
    return tuple(p.detach().to(dev) for p in (owner.hc_head_fn, owner.hc_head_scale, owner.hc_head_base))


def run(model, which, x, cu, op=None):
    op = op or OPS.hc_head
    return op(x, *params(model, which, x.device), cu, model.head.norm_eps, model.head.hc_eps)


def reference_per_sequence(model, which, x, cu):
    from parity.reference.model import hc_head as twin

    p = params(model, which, x.device)
    eps = (model.head.norm_eps, model.head.hc_eps)
    return torch.cat([twin(x[None, a:b], *p, *eps)[0] for a, b in zip(cu[:-1], cu[1:])])


def golden(x, fn, scale, base, norm_eps=1e-6, eps=1e-6):
    """The float64 math of hc_head -> (y, allowance in bf16 ulps per element): 1 ulp plus the fp32 collapse's
    absolute error, 2^-24 * sum_j |pre_j x_j| * (4 roundings + pre's own: 8 ulp + |scale| * S, S = rsqrt *
    sum_k |x_k fn_jk| the scale of the mixer GEMM's rounding), which only shows where the 4 terms cancel."""
    x = x.cpu()
    xf = x.flatten(1).double()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    m = (xf @ fn.cpu().double().T) * r
    pre = torch.sigmoid(m * scale.cpu().double() + base.cpu().double()) + eps
    y = (pre[..., None] * x.double()).sum(1)
    S = ((xf.abs() @ fn.cpu().double().abs().T) * r).amax(-1, keepdim=True)
    A = (pre[..., None] * x.double()).abs().sum(1)
    mag = y.abs().to(torch.bfloat16)
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    return y, 1 + 2.0**-24 * A * (4 + 8 + scale.cpu().double().abs() * S) / ulp


def judge(impl, got, want, gold):
    y, ulps = gold
    check(impl, got.cpu(), want.cpu(), golden=y, ulps=ulps)


@pytest.mark.parametrize(("lengths", "which"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, which):
    dev = device_of(impl)
    cu = cu_of(lengths)
    x = streams(cu[-1]).to(dev)
    out = run(ref_model, which, x, cu, impl)
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], 256)
    judge(impl, out, reference_per_sequence(ref_model, which, x, cu), golden(x, *params(ref_model, which)))


@pytest.mark.parametrize("lengths", [(5, 1, 37), (1,), (2, 1)])
def test_larger_dim(impl, lengths):
    # D 512 and a peaked sigmoid (scale 4): more K splits than the tiny model (the split path on the GPU too); 1-3
    # tokens: the triton kernel's narrow finisher (`_mhc.finisher`)
    dev = device_of(impl)
    fn, scale, base = larger_mixer()
    cu = cu_of(lengths)
    x = streams(cu[-1], d=512)
    args = [t.to(dev) for t in (x, fn, scale, base)]
    out = impl(*args, cu, 1e-6, 1e-6)
    from parity.reference.model import hc_head as twin

    want = torch.cat([twin(args[0][None, a:b], *args[1:], 1e-6, 1e-6)[0] for a, b in zip(cu[:-1], cu[1:])])
    judge(impl, out, want, golden(x, fn, scale, base))


def larger_mixer():
    g = torch.Generator().manual_seed(5)
    fn = torch.randn(4, 2048, generator=g) * 2048**-0.5
    return fn, torch.tensor([4.0]), torch.randn(4, generator=g) * 0.1


def test_segments_do_not_depend_on_batchmates_or_position(impl, ref_model):
    # every backend: a token's bits never depend on the batch around it (batch invariance)
    dev = device_of(impl)
    a = streams(37).to(dev)
    alone = run(ref_model, "main", a, (0, 37), impl)
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1), (300, 3)):
        x = torch.cat([streams(before).to(dev), a, streams(after).to(dev)])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        assert torch.equal(run(ref_model, "main", x, cu, impl)[before : before + 37], alone)


def test_output_is_written_everywhere(impl, ref_model):
    # a NaN-poisoned output buffer: an element the kernel does not write stays NaN and fails the comparison
    if impl.backend == "torch":
        pytest.skip("the torch backend allocates its output; it takes no output buffer")
    dev = device_of(impl)
    cu = cu_of((37, 1, 5))
    x = streams(cu[-1]).to(dev)
    out = torch.full((43, 256), float("nan"), dtype=torch.bfloat16, device=dev)
    got = impl(x, *params(ref_model, "mtp", dev), cu, ref_model.head.norm_eps, ref_model.head.hc_eps, out=out)
    assert got is out
    judge(impl, got, reference_per_sequence(ref_model, "mtp", x, cu), golden(x, *params(ref_model, "mtp")))


def test_planted_bug_bf16_collapse_is_caught(impl, ref_model):
    # a kernel that rounds the sigmoid weights to bf16 and sums the streams in bf16 must fail the comparison
    dev = device_of(impl)
    x = streams(63).to(dev)
    fn, scale, base = params(ref_model, "main", dev)
    xf = x.flatten(1).float()
    mixes = torch.nn.functional.linear(xf, fn) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + ref_model.norm_eps)
    pre = torch.sigmoid(mixes * scale + base) + ref_model.hc_eps
    buggy = torch.sum(pre.to(torch.bfloat16).unsqueeze(-1) * x, dim=1)
    with pytest.raises(AssertionError):
        judge(impl, buggy, run(ref_model, "main", x, (0, 63), impl), golden(x, *params(ref_model, "main")))


@pytest.fixture
def triton_head():
    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    return BackendImpl(OP, "triton", registry()[OP]["triton"], ops.hc_head)


def test_planted_bug_weights_on_the_wrong_streams_is_caught(triton_head, ref_model):
    # the kernel fed a mixer whose rows are rolled by one stream: what a kernel that pairs pre[j + 1] with x[j]
    # computes (an off-by-one stream index); it must fail the check of the true mixer's output
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = streams(63).to(dev)
    fn, scale, base = params(ref_model, "main", dev)
    buggy = triton_head(x, fn.roll(-1, 0), scale, base.roll(-1, 0), (0, 63), 1e-6, 1e-6)
    want = reference_per_sequence(ref_model, "main", x, (0, 63))
    judge(triton_head, triton_head(x, fn, scale, base, (0, 63), 1e-6, 1e-6), want, golden(x, fn, scale, base))
    with pytest.raises(AssertionError):
        judge(triton_head, buggy, want, golden(x, fn, scale, base))


@pytest.mark.parametrize("t", [1, 3, 9])
def test_narrow_finisher_has_the_block_finishers_bits(triton_head, t):
    # a launch of fewer tokens than a block finishes only the next power of two of them (`_mhc.finisher`): the same
    # bits as the whole block's finish, every element written (a NaN-poisoned buffer); D 512 takes the split path
    from parity.optimized.ops.triton import _mhc

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, (fn, scale, base) = streams(t, d=512).to(dev), (u.to(dev) for u in larger_mixer())

    def launch(**tuning):
        out = torch.full((t, 512), float("nan"), dtype=torch.bfloat16, device=dev)
        with _mhc.tuned(**tuning):
            return triton_head(x, fn, scale, base, (0, t), 1e-6, 1e-6, out=out)

    assert torch.equal(launch(), launch(BTF=_mhc.config(t, 512)["BT"]))
    # the K pieces regroup exact float64 sums (`_mhc.config`): the same bits whatever their size, one piece included
    for ksplit in (256, 512, 2048):
        assert torch.equal(launch(), launch(KSPLIT=ksplit)), ksplit

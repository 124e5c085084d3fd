"""hc_pre: mHC pre-mix, the hc residual streams of every token collapsed into one sublayer input.

Twin: `parity.reference.model.Block.hc_pre` on one request's `[1, s, hc, D]` streams -> y `[1, s, D]` bf16, post
`[1, s, hc]` and comb `[1, s, hc, hc]` fp32. The torch op runs the flat `[T, hc, D]` batch with the fp32 mixer GEMM
per segment (see dense_linear); the planted-bug test shows that one segment for the batch changes post/comb.

The triton kernel cannot follow the twin's BLAS summation order, so it is judged against float64 goldens
(`golden()`): every output within the twin's own error plus the allowance of `allowances()` (the registry entry's
tolerance). Its planted bugs (one Sinkhorn pair short, comb
transposed, rsqrt applied to bf16-rounded streams before the projection) must fail that same check.
"""

import copy
import itertools

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from tests.optimized.ops.conftest import DEVICES, BackendImpl, check, skip_unless_batch_changes_bits

OP = "hc_pre"
OPS = resolve_ops()

CASES = [
    ((1,), 0, "attn"),
    ((2,), 2, "ffn"),
    ((5,), 1, "attn"),
    ((37,), 3, "ffn"),
    ((63,), 0, "ffn"),
    ((129,), 2, "attn"),
    ((1, 2, 5), 1, "ffn"),
    ((37, 1, 63), 3, "attn"),
    ((1, 1, 1, 1, 1), 2, "attn"),
    ((2, 5, 1, 3, 1), 0, "attn"),
]
PARAMS = [pytest.param(*c, id="L{}-layer{}-{}".format("_".join(map(str, c[0])), *c[1:])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def streams(t, hc=4, d=256):
    return torch.randn(t, hc, d).to(torch.bfloat16)


def poisoned(t, d, dev):
    """NaN-filled (y, post, comb) output buffers for `t` tokens of width `d`: an element the kernel does not write
    stays NaN and fails any comparison."""
    nan = float("nan")
    return (torch.full((t, d), nan, dtype=torch.bfloat16, device=dev), torch.full((t, 4), nan, device=dev),
            torch.full((t, 4, 4), nan, device=dev))  # fmt: skip


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def mixer(block, which):
    return tuple(getattr(block, f"hc_{which}_{p}") for p in ("fn", "scale", "base"))


def run(block, which, x, cu, op=None):
    fn, scale, base = mixer(block, which)
    op = op or OPS.hc_pre
    return op(x, fn, scale, base, cu, block.norm_eps, block.hc_mult, block.hc_sinkhorn_iters, block.hc_eps)


def reference_per_sequence(block, which, x, cu):
    outs = [block.hc_pre(x[None, a:b], *mixer(block, which)) for a, b in zip(cu[:-1], cu[1:])]
    return tuple(torch.cat([o[i][0] for o in outs]) for i in range(3))


def golden(x, fn, scale, base, norm_eps, hc, iters, eps):
    """The float64 math of hc_pre -> (y, post, comb) and what the allowances scale with: S [T, (2+hc)*hc] =
    rsqrt * sum_k |x_k fn_nk| (a mixer GEMM's rounding error grows with it) and A [T, D] = sum_j |pre_j x_j| (the
    fp32 collapse's rounding error grows with it)."""
    x = x.cpu()
    xf = x.flatten(1).double()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + norm_eps)
    m = (xf @ fn.double().T) * r
    s, b = scale.double(), base.double()
    pre = torch.sigmoid(m[:, :hc] * s[0] + b[:hc]) + eps
    post = 2 * torch.sigmoid(m[:, hc : 2 * hc] * s[1] + b[hc : 2 * hc])
    c = torch.softmax((m[:, 2 * hc :] * s[2] + b[2 * hc :]).unflatten(-1, (hc, hc)), -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    y = (pre[..., None] * x.double()).sum(1)
    S = (xf.abs() @ fn.double().abs().T) * r
    A = (pre[..., None] * x.double()).abs().sum(1)
    return (y, post, c), (S, A)


def ulp_of(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mag = g.abs().to(dtype)
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def allowances(S, A, y, scale, hc=4):
    """Units in the last place of each output beyond the twin's own error, per element (the registry tolerance).
    post / comb (fp32): the fp32 Sinkhorn's own rounding (8 / 16 ulp; exactly rounded mixes leave up to ~3 / ~13)
    plus a mix error of 2^-24 * S carried through the logits: post (sigmoid) by |scale[1]|, comb by 2 * |scale[2]|
    (softmax: a relative change of at most twice the largest logit change; Sinkhorn keeps relative perturbations);
    the kernels measured on CPU use at most ~30% of that term. y (bf16): 1 ulp plus the fp32 collapse's absolute
    error, 2^-24 * A * (4 roundings + pre's own allowance), which only shows where the 4 terms cancel."""
    s = scale.detach().double().abs().cpu()
    post = 8 + s[1] * S[:, hc : 2 * hc]
    comb = 16 + 2 * s[2] * S[:, 2 * hc :].amax(-1)[:, None, None]
    pre_rel = 8 + s[0] * S[:, :hc].amax(-1, keepdim=True)
    y_ulps = 1 + 2.0**-24 * A * (4 + pre_rel) / ulp_of(y, torch.bfloat16)
    return y_ulps, post, comb


def judge(impl, got, want, gold, scale, hc=4):
    (gy, gp, gc), (S, A) = gold
    y_ulps, post_ulps, comb_ulps = allowances(S, A, gy, scale, hc)
    got = [t.cpu() for t in got]
    want = [t.cpu() for t in want]
    check(impl, got[0], want[0], golden=gy, ulps=y_ulps)
    check(impl, got[1], want[1], golden=gp, ulps=post_ulps)
    check(impl, got[2], want[2], golden=gc, ulps=comb_ulps)


def golden_of(block, which, x):
    fn, scale, base = mixer(block, which)
    args = (block.norm_eps, block.hc_mult, block.hc_sinkhorn_iters, block.hc_eps)
    return golden(x.cpu(), fn.detach().cpu(), scale.detach().cpu(), base.detach().cpu(), *args)


@pytest.mark.parametrize(("lengths", "layer", "which"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, layer, which):
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[layer]).to(dev)
    cu = cu_of(lengths)
    x = streams(cu[-1]).to(dev)
    y, post, comb = run(block, which, x, cu, impl)
    assert (y.dtype, post.dtype, comb.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert y.shape == (cu[-1], 256) and post.shape == (cu[-1], 4) and comb.shape == (cu[-1], 4, 4)
    want = reference_per_sequence(block, which, x, cu)
    judge(impl, (y, post, comb), want, golden_of(block, which, x), mixer(block, which)[1])


def test_mtp_block_mixer(impl, ref_model):
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.mtp[0]).to(dev)
    cu = cu_of((5, 1, 37))
    x = streams(cu[-1]).to(dev)
    got = run(block, "attn", x, cu, impl)
    judge(impl, got, reference_per_sequence(block, "attn", x, cu), golden_of(block, "attn", x), block.hc_attn_scale)


def synthetic_mixer(d, comb_scale, hc=4, seed=3):
    """A mixer like the checkpoint's (fn ~ N(0, 1/(hc*d)), scale in [0.5, 1.5), base ~ N(0, 0.1^2)), with the comb
    logit scale set: large values make the softmax peaked and the Sinkhorn converge slowly."""
    g = torch.Generator().manual_seed(seed)
    mix = (2 + hc) * hc
    fn = torch.randn(mix, hc * d, generator=g) * (hc * d) ** -0.5
    scale = 0.5 + torch.rand(3, generator=g)
    scale[2] = comb_scale
    return fn, scale, torch.randn(mix, generator=g) * 0.1


def run_synthetic(op, x, fn, scale, base, cu, iters=20):
    return op(x, fn, scale, base, cu, 1e-6, 4, iters, 1e-6)


def twin_synthetic(x, fn, scale, base, cu, iters=20, hc=4):
    from parity.reference.model import hc_pre as twin

    outs = [twin(x[None, a:b], fn, scale, base, 1e-6, hc, iters, 1e-6) for a, b in zip(cu[:-1], cu[1:])]
    return tuple(torch.cat([o[i][0] for o in outs]) for i in range(3))


@pytest.mark.parametrize(
    ("d", "comb_scale", "lengths"),
    [(512, 1.0, (5, 37)), (256, 6.0, (63, 1, 2)), (512, 6.0, (1,)), (512, 1.0, (2, 1)), (512, 6.0, (3, 1, 1))],
)
def test_larger_dim_and_slow_sinkhorn(impl, d, comb_scale, lengths):
    # D 512: more K splits than the tiny model (the split path on the GPU too); comb scale 6: a peaked softmax whose
    # Sinkhorn is still moving at iteration 20, where the fp32 divisions and the logit errors weigh most; 1-5 tokens:
    # the triton kernel's narrow finisher (`_mhc.finisher`)
    dev = device_of(impl)
    fn, scale, base = synthetic_mixer(d, comb_scale)
    cu = cu_of(lengths)
    x = streams(cu[-1], d=d)
    args = [t.to(dev) for t in (x, fn, scale, base)]
    got = run_synthetic(impl, *args, cu)
    want = twin_synthetic(*args, cu)
    judge(impl, got, want, golden(x, fn, scale, base, 1e-6, 4, 20, 1e-6), scale)


@pytest.mark.parametrize("hc", [1, 2, 8])
def test_stream_counts_other_than_four(impl, hc):
    # V4 has 4 streams; the kernel takes any power of two, and its mix columns are laid out per count (comb in the
    # first half, pre and post in the second: `_mhc.fn_rows`), which for one stream is not a plain split
    dev = device_of(impl)
    fn, scale, base = synthetic_mixer(64, 2.0, hc=hc)
    cu = cu_of((5, 1, 17))
    x = streams(cu[-1], hc=hc, d=64)
    args = [t.to(dev) for t in (x, fn, scale, base)]
    got = impl(*args, cu, 1e-6, hc, 20, 1e-6)
    assert got[0].shape == (cu[-1], 64) and got[1].shape == (cu[-1], hc) and got[2].shape == (cu[-1], hc, hc)
    want = twin_synthetic(*args, cu, hc=hc)
    judge(impl, got, want, golden(x, fn, scale, base, 1e-6, hc, 20, 1e-6), scale, hc)


def test_segments_do_not_depend_on_batchmates_or_position(impl, ref_model):
    # every backend: a token's bits never depend on the batch around it (batch invariance)
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[2]).to(dev)
    a = streams(37).to(dev)
    alone = run(block, "attn", a, (0, 37), impl)
    for before, after in ((1, 2), (5, 0), (0, 1), (63, 1), (300, 3)):
        x = torch.cat([streams(before).to(dev), a, streams(after).to(dev)])
        cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
        for got, want in zip(run(block, "attn", x, cu, impl), alone):
            assert torch.equal(got[before : before + 37], want)


def test_outputs_are_written_everywhere(impl, ref_model):
    # NaN-poisoned output buffers: an element the kernel does not write stays NaN and fails the comparison
    if impl.backend == "torch":
        pytest.skip("the torch backend allocates its outputs; it takes no output buffers")
    dev = device_of(impl)
    block = copy.deepcopy(ref_model.layers[1]).to(dev)
    cu = cu_of((37, 1, 5))
    x = streams(cu[-1]).to(dev)
    out = poisoned(43, 256, dev)
    fn, scale, base = mixer(block, "ffn")
    got = impl(x, fn, scale, base, cu, block.norm_eps, 4, block.hc_sinkhorn_iters, block.hc_eps, out=out)
    assert all(g is o for g, o in zip(got, out))
    judge(impl, got, reference_per_sequence(block, "ffn", x, cu), golden_of(block, "ffn", x), scale)


# the fp32 mixer GEMM over the whole batch changes mixes, hence post/comb, where the machine's BLAS rounds by row
# count (y survives the bf16 cast in these cases, so only "some output differs" is asserted); measured per case
BREAKS = [
    pytest.param((1, 5), id="L1_5"),
    pytest.param((2, 3), id="L2_3"),
    pytest.param((37, 1, 63), id="L37_1_63"),
    pytest.param((1, 1, 1, 1), id="L1_1_1_1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths", BREAKS)
def test_planted_bug_one_segment_for_the_batch_is_not_bitwise(ref_model, lengths, device):
    block = copy.deepcopy(ref_model.layers[2]).to(device)
    cu = cu_of(lengths)
    x = streams(cu[-1]).to(device)
    expected = reference_per_sequence(block, "attn", x, cu)
    assert all(torch.equal(g, w) for g, w in zip(run(block, "attn", x, cu), expected))
    whole = reference_per_sequence(block, "attn", x, (0, cu[-1]))
    skip_unless_batch_changes_bits(
        torch.cat([t.flatten() for t in expected]), torch.cat([t.flatten() for t in whole]), "hc_pre"
    )
    assert not all(torch.equal(g, w) for g, w in zip(run(block, "attn", x, (0, cu[-1])), expected))


@pytest.mark.parametrize("t", [1, 2, 3, 5, 9, 37])
def test_narrow_finisher_has_the_block_finishers_bits(kernel, t):
    # a launch of fewer tokens than a block finishes only the next power of two of them (`_mhc.finisher`): the same
    # bits as the whole block's finish, every output written (NaN-poisoned buffers); D 512 takes the split path
    from parity.optimized.ops.triton import _mhc, runtime

    _, module = kernel
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fn, scale, base = synthetic_mixer(512, 6.0)
    args = [u.to(dev) for u in (streams(t, d=512), fn, scale, base)]

    def launch(**tuning):
        out = poisoned(t, 512, dev)
        with _mhc.tuned(**tuning):
            return module.launch(*args, 1e-6, 4, 20, 1e-6, out=out)

    block = _mhc.config(t, 512)
    assert block["BTF"] == min(block["BT"], runtime.next_pow2(t))
    for narrow, whole in zip(launch(), launch(BTF=block["BT"])):
        assert torch.equal(narrow, whole)
    if t > 2:  # a finisher narrower than the launch's tokens would leave rows unwritten: refused
        with pytest.raises(ValueError, match="cannot finish"):
            launch(BTF=2)
    # the K pieces (`config` picks them by launch size) regroup exact float64 sums: the same bits for pieces of 256
    # and 512 elements and for one piece (K 2048: no split, the mixes finished in the GEMV's registers)
    for ksplit in (256, 512, 2048):
        for default, regrouped in zip(launch(), launch(KSPLIT=ksplit)):
            assert torch.equal(default, regrouped), ksplit
    # the collapse as a launch of its own (APART), with and without the K split, and by collapse programs queued
    # after the mix programs (TAIL; one, two or four column ranges, one or three token blocks, a range in one or two
    # BD-wide tiles): the same products and sums
    tails = [dict(TAIL=True, SHARE=False), dict(TAIL=True, SHARE=False, BDT=128, BT=16)]
    tails += [dict(TAIL=True, SHARE=False, BDT=256, BD=128, BT=16)]
    for tuning in [dict(APART=True), dict(APART=True, KSPLIT=2048)] + tails:
        for default, apart in zip(launch(), launch(**tuning)):
            assert torch.equal(default, apart), tuning
    # the collapse shared by the split programs (SHARE, on the GPU by default where the grid fits the SMs:
    # `hc_pre._collapse_share`) against the finisher collapsing every column; the interpreter runs programs in turn
    # and refuses it (a waiting program would wait forever)
    if dev == "cuda":
        for default, alone in zip(launch(), launch(SHARE=False)):
            assert torch.equal(default, alone)
    else:
        with pytest.raises(ValueError, match="SHARE"):
            launch(SHARE=True)


@pytest.mark.gpu
def test_shared_collapse_resets_its_flags_between_launches(kernel):
    # SHARE's programs wait on a per-block flag that the last of them resets: launches back to back with different
    # inputs must each collapse with their own pre (a flag left set would let the next launch's programs read the
    # last launch's pre), whatever the block count
    from parity.optimized.ops.triton import _mhc

    _, module = kernel
    fn, scale, base = (u.cuda() for u in synthetic_mixer(512, 6.0))
    xs = [streams(t, d=512).cuda() for t in (1, 16, 37, 5, 16, 64)]
    shared = [module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6) for x in xs]
    with _mhc.tuned(SHARE=False):
        alone = [module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6) for x in xs]
    for got, want in zip(shared, alone):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.gpu
def test_prefill_tail_default_has_the_finishers_bits(kernel):
    # from 256 tokens the GPU default queues the collapse behind the mix programs (TAIL, `_mhc.prefill_tiles`: 16-row
    # blocks at 300 Flash tokens, 64-row blocks of 1024-element K pieces at 1100): back to back, each launch must give
    # the bits of the finishing program's collapse at the same tiles (TAIL off); a column tile never collapsed, a
    # ticket counter left nonzero or a collapse before its block's pre would not
    from parity.optimized.ops.triton import _mhc

    _, module = kernel
    fn, scale, base = (u.cuda() for u in synthetic_mixer(4096, 6.0))
    xs = [streams(t, d=4096).cuda() for t in (300, 1100, 300)]
    assert [_mhc.config(x.shape[0], 4096, "hc_pre")["BT"] for x in xs] == [16, 64, 16]
    queued = [module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6) for x in xs]
    with _mhc.tuned(TAIL=False):
        alone = [module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6) for x in xs]
    assert all(_mhc.config(x.shape[0], 4096, "hc_pre")["TAIL"] for x in xs)
    for got, want in zip(queued, alone):
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize(("plant", "what"), [(3, "a waiter collapses the next share"), (4, "flag never reset")])
def test_planted_bug_in_the_shared_collapse_is_caught(kernel, plant, what):
    # the two tests above must fail when SHARE is broken: plant 3 leaves one program's columns unwritten (NaN-poisoned
    # buffers), plant 4 leaves the block's flag set, so the next launch's waiting programs read pre before the
    # finisher writes it (they all arrived before it, so they do not wait for it)
    from parity.optimized.ops.triton import _mhc, runtime

    _, module = kernel
    fn, scale, base = (u.cuda() for u in synthetic_mixer(512, 6.0))
    xs = [streams(t, d=512).cuda() for t in (16, 37, 5, 16)]

    def launches(**kw):
        return [
            module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6, out=poisoned(x.shape[0], 512, "cuda"), **kw)
            for x in xs
        ]

    cfg = _mhc.config(16, 512, "hc_pre")
    splits, n_blocks = runtime.cdiv(4 * 512, cfg["KSPLIT"]), runtime.cdiv(16, cfg["BT"])
    assert module.share_plan(cfg, splits, n_blocks, 512, runtime.sm_count(xs[0].device))[0], "16 tokens do not share"
    try:
        planted = launches(plant=plant)
    finally:
        for buf in _mhc._COUNTERS.values():  # plant 4 leaves flags set
            buf.zero_()
    with _mhc.tuned(SHARE=False):
        alone = launches()
    assert not all(torch.equal(g, w) for got, want in zip(planted, alone) for g, w in zip(got, want)), what


# ---- planted bugs of the triton kernel: each must fail the tolerance the correct kernel passes on the same inputs


@pytest.fixture
def kernel():
    """(the triton BackendImpl, the kernel module) with the runtime set up (Triton: interpreter without a GPU)."""
    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    from parity.optimized.ops.triton import hc_pre as module

    return BackendImpl(OP, "triton", registry()[OP]["triton"], ops.hc_pre), module


def planted_case(ref_model, layer, which, t, comb_scale=None):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fn, scale, base = (p.detach().clone() for p in mixer(ref_model.layers[layer], which))
    if comb_scale is not None:
        scale[2] = comb_scale
    x = streams(t)
    gold = golden(x, fn, scale, base, 1e-6, 4, 20, 1e-6)
    want = twin_synthetic(*(u.to(dev) for u in (x, fn, scale, base)), (0, t))
    return [u.to(dev) for u in (x, fn, scale, base)], want, gold, scale


@pytest.mark.parametrize(("t", "comb_scale"), [(129, None), (64, 4.0)], ids=["checkpoint-mixer", "comb-scale-4"])
def test_planted_bug_one_sinkhorn_pair_short_is_caught(kernel, ref_model, t, comb_scale):
    # 19 row/column pairs where the model asks for 20 (a real bring-up bug): with the checkpoint's layer-1 ffn mixer
    # a few of 129 tokens are still converging at iteration 20 (measured: ~200 comb elements beyond the allowance, by
    # up to ~10^4 ulp); a comb scale of 4 leaves most tokens converging
    tri, module = kernel
    (x, fn, scale, base), want, gold, s = planted_case(ref_model, 1, "ffn", t, comb_scale)
    judge(tri, module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6), want, gold, s)
    with pytest.raises(AssertionError, match="comb"):
        judge(tri, module.launch(x, fn, scale, base, 1e-6, 4, 19, 1e-6), want, gold, s)


@pytest.mark.parametrize(("plant", "what"), [(1, "comb written as [k, j]"), (2, "rsqrt before the projection")])
def test_planted_bug_in_the_kernel_is_caught(kernel, ref_model, plant, what):
    # plant 2: the streams normalized first and rounded back to bf16, as a tensor-core GEMM would take them (in exact
    # arithmetic applying the rsqrt before or after the projection is the same; the bf16 rounding is the bug)
    tri, module = kernel
    (x, fn, scale, base), want, gold, s = planted_case(ref_model, 1, "ffn", 63)
    with pytest.raises(AssertionError):
        judge(tri, module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6, plant=plant), want, gold, s)


# ---- the GPU's mixer GEMM: fn as three bf16 pieces on the tensor cores (`_mhc.split3`, `_mhc.mix_partial`)


@pytest.mark.parametrize(("plant", "t"), [(0, 63), (0, 129), (5, 63)], ids=["63", "129", "planted-fn-in-bf16"])
def test_tensor_core_mixer_gemm_within_tolerance(kernel, ref_model, plant, t):
    # the GPU's chunk dot (three bf16 pieces of fn, exact products, fp32 accumulation over each chunk) run in the
    # interpreter too (ROWWISE off; there its sums round by a row's place in the tile, so no bit claims here), judged
    # like every other path; plant 5 keeps only fn's bf16 piece (a plain bf16 tensor-core GEMM) and must fail
    from parity.optimized.ops.triton import _mhc

    tri, module = kernel
    (x, fn, scale, base), want, gold, s = planted_case(ref_model, 1, "ffn", t)
    with _mhc.tuned(ROWWISE=False):
        got = module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6, plant=plant)
    if plant:
        with pytest.raises(AssertionError):
            judge(tri, got, want, gold, s)
    else:
        judge(tri, got, want, gold, s)


def test_planted_bug_in_the_tail_collapse_is_caught(kernel):
    # TAIL needs every column tile of every block: plant 6 queues one collapse program short per block, so each
    # block's last 128 columns stay NaN (poisoned buffers), which the tolerance check fails on as any NaN
    from parity.optimized.ops.triton import _mhc

    _, module = kernel
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fn, scale, base = (u.to(dev) for u in synthetic_mixer(512, 6.0))
    x = streams(37, d=512).to(dev)

    def launch(plant):
        out = poisoned(37, 512, dev)
        with _mhc.tuned(TAIL=True, SHARE=False, BT=16, BDT=128):
            return module.launch(x, fn, scale, base, 1e-6, 4, 20, 1e-6, out=out, plant=plant)

    good, planted = launch(0), launch(6)
    assert not good[0].isnan().any()
    assert planted[0][:, 384:].isnan().all() and torch.equal(planted[0][:, :384], good[0][:, :384])

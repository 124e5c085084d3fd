"""moe_experts: grouped MoE experts (tokens sorted by expert, one batched SwiGLU FFN per expert, fp32 accumulation per
token in ascending expert id) plus the shared expert.

Twin: `parity.reference.model.MoE.forward` (its expert loop over `Expert.forward`) on one request's `[1, s, D]`
tokens. The routing comes from the reference gate of each request (moe_gate is tested on its own), so the test
isolates the experts: the op sees every token of the batch that picked an expert in one call, while the reference
expert sees only its request's tokens; the quantized GEMMs are row-independent, so the results must be equal.
The FP4/FP8 kernels allocate their outputs in the default dtype: everything runs under default_dtype(bf16).

Backends that are not bitwise are judged by `moe_spans`: the twin's own intermediates, with every stage's possible
deviation propagated to the output (GEMM block allowance -> reachable bf16 values of g and u -> interval of h ->
reachable e4m3 values and scales of its act_quant -> w2 GEMM -> fp32 combine -> bf16). An output element may differ
from the twin's only by what that propagation reaches, and must equal it where nothing can flip.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from parity.formats import (
    dequantize_fp8_blocks,
    e8m0_to_float,
    fp4_to_float,
    quantize_fp4_groups,
    quantize_fp8_blocks,
)
from parity.optimized.ops import OpsConfig, resolve_ops
from parity.optimized.ops.moe_experts import ExpertWeights, expert_forward
from parity.reference import kernels
from parity.reference import model as ref
from tests.optimized.ops.gemm_check import check_gemm, fp8_block_allowance, rounding_span

OP = "moe_experts"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# layers 0/1 route by hash, 2/3 by score; tiny: 8 FP4 routed experts, top-2, FP8 shared expert, swiglu_limit 10
CASES = [
    ((1,), 0),
    ((2,), 2),
    ((5,), 3),
    ((7,), 2),
    ((37,), 1),
    ((63,), 2),
    ((64,), 0),
    ((129,), 3),
    ((1, 2, 5), 0),
    ((37, 1, 63), 2),
    ((1, 1, 1, 1, 1), 3),
    ((2, 5, 1, 3, 1), 1),
]
PARAMS = [pytest.param(*c, id="L{}-layer{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]
# the CPU interpreter pays about a second per Triton MoE call: there it runs these cases (one token, 7, 64 and 129
# tokens, ragged batches, hash and score layers); on a GPU it runs all of them
INTERPRETER_CASES = {((1,), 0), ((7,), 2), ((64,), 0), ((129,), 3), ((37, 1, 63), 2), ((2, 5, 1, 3, 1), 1)}


def interpreted(impl) -> bool:
    return impl.backend != "torch" and DEV == "cpu"


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def expert_weights(e: ref.Expert) -> ExpertWeights:
    return ExpertWeights(
        (e.w1.weight, e.w1.scale), (e.w2.weight, e.w2.scale), (e.w3.weight, e.w3.scale), e.swiglu_limit
    )


def on_dev(e: ExpertWeights) -> ExpertWeights:
    return ExpertWeights(*((w.to(DEV), s.to(DEV)) for w, s in (e.w1, e.w2, e.w3)), e.swiglu_limit)


def tokens(t):
    return torch.randn(t, 256).to(torch.bfloat16).to(DEV), torch.randint(0, 1024, (t,))


def route(moe, x, ids, cu):
    outs = [moe.gate(x[a:b].cpu(), ids[a:b]) for a, b in zip(cu[:-1], cu[1:])]
    return torch.cat([o[0] for o in outs]).to(DEV), torch.cat([o[1] for o in outs]).to(DEV)


def weights_of(moe):
    return [on_dev(expert_weights(e)) for e in moe.experts], on_dev(expert_weights(moe.shared_experts))


def policy(tiny_args):
    return tiny_args.act_scale_fmt, tiny_args.act_scale_dtype


def reference(experts, shared, x, weights, indices, fmt, sdtype):
    """The twin's loop (ref.MoE.forward after the gate): experts in ascending id, fp32 accumulation, shared last."""
    y = torch.zeros_like(x, dtype=torch.float32)
    for e, expert in enumerate(experts):
        rows, slot = torch.where(indices == e)
        if rows.numel():
            y[rows] += expert_forward(expert, x[rows], weights[rows, slot, None], fmt, sdtype)
    y += expert_forward(shared, x, None, fmt, sdtype)
    return y.type_as(x)


def module_reference(moe, x, ids, cu, experts, shared, weights, indices, tiny_args):
    """The twin: ref.MoE itself per request on CPU; on CUDA its expert loop on the device (`reference`), since
    torch's silu rounds differently on the two devices and the backend under test runs on CUDA there."""
    if DEV == "cpu":
        return torch.cat([moe(x[None, a:b], ids[None, a:b])[0] for a, b in zip(cu[:-1], cu[1:])])
    return reference(experts, shared, x, weights, indices, *policy(tiny_args))


# ---- the propagation oracle ----------------------------------------------------------------------------------


def dequant_weight(w, s):
    if w.dtype == torch.float4_e2m1fn_x2:
        n = w.shape[0]
        return fp4_to_float(w.view(torch.uint8)).view(n, -1).double() * e8m0_to_float(s).double().repeat_interleave(
            32, -1
        )
    return dequantize_fp8_blocks(w, s).double()


def dequant_act(q, s):
    s = e8m0_to_float(s) if s.dtype == torch.float8_e8m0fnu else s
    return q.double() * s.double().repeat_interleave(128, -1)


def block_k(w):
    return 32 if w.dtype == torch.float4_e2m1fn_x2 else 128


def requant_span(h, span, fmt, sdtype):
    """Largest change of act_quant's dequantized value of each element when every bf16 h_j may be anything in
    [h_j - span_j, h_j + span_j] (the group's power-of-two scale may change with its amax)."""
    n, k = h.shape
    hv, sp = h.double().view(n, k // 128, 128), span.view(n, k // 128, 128)
    q, s = kernels.act_quant(h, 128, fmt, sdtype)
    base = dequant_act(q, s).view(n, k // 128, 128)
    worst = torch.zeros_like(base)
    for amax in ((hv.abs() - sp).clamp(min=0).amax(-1), (hv.abs() + sp).amax(-1), hv.abs().amax(-1)):
        scale = kernels._group_scales(amax.float()[..., None], 1e-4, 1.0 / 448.0, fmt is not None).double()
        for v in (hv - sp, hv + sp):
            deq = (v / scale).clamp(-448, 448).float().to(torch.float8_e4m3fn).double() * scale
            worst = torch.maximum(worst, (deq - base).abs())
    return worst.view(n, k)


def expert_span(ew: ExpertWeights, x, rw, fmt, sdtype):
    """(golden fp32-accumulator value, reachable deviation) of one expert's bf16 output rows [n, D]."""
    xq, xs = kernels.act_quant(x, 128, fmt, sdtype)
    a = dequant_act(xq, xs)
    w1, w3, w2 = (dequant_weight(*ew.w1), dequant_weight(*ew.w3), dequant_weight(*ew.w2))
    nb1, nb2 = x.shape[1] // block_k(ew.w1[0]), w2.shape[1] // block_k(ew.w2[0])
    with ref.default_dtype(torch.bfloat16):
        g = ref.linear(x, *ew.w1, fmt, sdtype).float()
        u = ref.linear(x, *ew.w3, fmt, sdtype).float()
    span_g = rounding_span(a @ w1.T, fp8_block_allowance(a.abs() @ w1.abs().T, nb1, DEV, regrouped=False))
    span_u = rounding_span(a @ w3.T, fp8_block_allowance(a.abs() @ w3.abs().T, nb1, DEV, regrouped=False))
    lim = ew.swiglu_limit
    if lim > 0:
        u, g = u.clamp(-lim, lim), g.clamp(max=lim)
    h32 = F.silu(g) * u
    w = 1.0 if rw is None else rw.double().abs()
    if rw is not None:
        h32 = rw * h32
    # first order in the GEMM deviations (|silu'| < 1.1, clamps are 1-Lipschitz) plus exp / division ulps
    dh = w * (1.1 * span_g * u.double().abs() + F.silu(g).double().abs() * span_u + 1.1 * span_g * span_u)
    dh = dh + 2.0**-20 * h32.double().abs()
    h = h32.to(torch.bfloat16)
    span_h = rounding_span(h32.double(), dh)
    hq, hs = kernels.act_quant(h, 128, fmt, sdtype)
    hd = dequant_act(hq, hs)
    delta = (
        fp8_block_allowance(hd.abs() @ w2.abs().T, nb2, DEV, regrouped=False)
        + requant_span(h, span_h, fmt, sdtype) @ w2.abs().T
    )
    return hd @ w2.T, delta


def moe_spans(experts, shared, x, weights, indices, fmt, sdtype):
    """float64 [T, D]: how far the output of a kernel that follows the twin's rounding points may be from the
    twin's, given only block-product and exp() differences (see the module docstring)."""
    want_parts = torch.zeros(x.shape, dtype=torch.float64, device=x.device)  # sum of the twin's bf16 terms
    reach = torch.zeros_like(want_parts)
    absum = torch.zeros_like(want_parts)
    terms = [(e, *torch.where(indices == e)) for e in range(len(experts))]
    for e, rows, slot in terms:
        if rows.numel() == 0:
            continue
        gold, delta = expert_span(experts[e], x[rows], weights[rows, slot, None], fmt, sdtype)
        reach[rows] += rounding_span(gold, delta)
        absum[rows] += gold.abs()
        want_parts[rows] += gold
    gold, delta = expert_span(shared, x, None, fmt, sdtype)
    reach += rounding_span(gold, delta)
    absum += gold.abs()
    want_parts += gold
    # fp32 additions of up to k + 1 terms (same order in both) and the final bf16 rounding
    return rounding_span(want_parts, reach + 2.0**-20 * absum)


def check_moe(impl, out, expected, experts, shared, x, weights, indices, fmt, sdtype):
    spans = torch.zeros(1) if impl.bitwise else moe_spans(experts, shared, x, weights, indices, fmt, sdtype)
    check_gemm(impl, out, expected, expected.double(), spans, ulps=0)


# ---- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lengths", "layer"), PARAMS)
def test_ragged_matches_reference_moe_per_sequence(impl, ref_model, tiny_args, lengths, layer):
    if interpreted(impl) and (lengths, layer) not in INTERPRETER_CASES:
        pytest.skip("CPU interpreter budget: this shape class is covered by the interpreter cases; runs on a GPU")
    moe = ref_model.layers[layer].ffn
    cu = cu_of(lengths)
    x, ids = tokens(cu[-1])
    experts, shared = weights_of(moe)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, cu)
        out = impl(x, weights, indices, experts, shared, *policy(tiny_args))
        expected = module_reference(moe, x, ids, cu, experts, shared, weights, indices, tiny_args)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        check_moe(impl, out, expected, experts, shared, x, weights, indices, *policy(tiny_args))


@pytest.mark.parametrize("layer", [0, 2])
def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model, tiny_args, layer):
    # every backend: a token's bits never depend on the other tokens of its experts (the Triton kernels' token
    # tiles change with the batch, their per-token math does not)
    moe = ref_model.layers[layer].ffn
    experts, shared = weights_of(moe)
    a, a_ids = tokens(37)
    # the CPU interpreter pays about a second per call: there one batch with mates on both sides
    batches = ((63, 1),) if interpreted(impl) else ((1, 2), (5, 0), (0, 1), (63, 1))
    with ref.default_dtype(torch.bfloat16):
        alone = impl(a, *route(moe, a, a_ids, (0, 37)), experts, shared, *policy(tiny_args))
        for before, after in batches:
            (xb, ib), (xa, ia) = tokens(before), tokens(after)
            x, ids = torch.cat([xb, a, xa]), torch.cat([ib, a_ids, ia])
            cu = tuple(sorted({0, before, before + 37, x.shape[0]}))
            out = impl(x, *route(moe, x, ids, cu), experts, shared, *policy(tiny_args))
            assert torch.equal(out[before : before + 37], alone)


def test_empty_and_crowded_experts(impl, ref_model, tiny_args):
    # every token routed to experts 6 and 1 (expert 6 first in the row): six empty experts, two crowded ones, the
    # per-token sum still in ascending expert id
    moe = ref_model.layers[2].ffn
    experts, shared = weights_of(moe)
    x, _ = tokens(70)
    indices = torch.tensor([[6, 1]], device=DEV).expand(70, 2).contiguous()
    weights = torch.rand(70, 2, device=DEV) * 1.5
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        out = impl(x, weights, indices, experts, shared, fmt, sdtype)
        expected = reference(experts, shared, x, weights, indices, fmt, sdtype)
        check_moe(impl, out, expected, experts, shared, x, weights, indices, fmt, sdtype)


def fp8_experts(n, inter, dim, limit, seed=5):
    """Routed experts in the V4-Flash-Base layout: e4m3 weights with 128x128 e8m0 block scales."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        w, s = quantize_fp8_blocks(torch.randn(o, i, generator=g) * i**-0.5)
        return w.to(DEV), s.to(DEV)

    return [ExpertWeights(lin(inter, dim), lin(dim, inter), lin(inter, dim), limit) for _ in range(n)]


@pytest.mark.parametrize("t", [1, 16])
def test_fp8_routed_experts(impl, ref_model, tiny_args, t):
    # the same op on FP8 routed experts (V4-Flash-Base); the twin is the reference expert math on those weights
    moe = ref_model.layers[3].ffn
    _, shared = weights_of(moe)
    experts = fp8_experts(8, 128, 256, tiny_args.swiglu_limit)
    x, ids = tokens(t)
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, (0, t))
        out = impl(x, weights, indices, experts, shared, fmt, sdtype)
        expected = reference(experts, shared, x, weights, indices, fmt, sdtype)
        check_moe(impl, out, expected, experts, shared, x, weights, indices, fmt, sdtype)
        if impl.backend == "triton":  # the FP8 blocks' power-of-two form (one fma) against the twin's, bit for bit
            from parity.optimized.ops.triton import moe_experts as module

            plain = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _pow2=False)
            assert torch.equal(out, plain)


# ---- planted bugs: each must fail the comparison --------------------------------------------------------------


def test_planted_bug_bf16_accumulation_is_caught(impl, ref_model, tiny_args):
    # a kernel that accumulates the expert outputs in bf16 instead of fp32 must fail the comparison
    if impl.backend != "torch" and DEV == "cuda":
        pytest.skip(
            "on the GPU the FP8 MMA block allowance (2^-12 of the terms' absolute sum) lets most expert outputs "
            "reach the neighbouring bf16 value, which covers a bf16 rounding of the running sum; the scale and "
            "group bugs below stay visible there"
        )
    moe = ref_model.layers[2].ffn
    experts, shared = weights_of(moe)
    x, ids = tokens(16)
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, (0, 16))
        expected = module_reference(moe, x, ids, (0, 16), experts, shared, weights, indices, tiny_args)
        buggy = torch.zeros_like(x)
        for e, expert in enumerate(experts):
            rows, slot = torch.where(indices == e)
            if rows.numel():
                buggy[rows] += expert_forward(expert, x[rows], weights[rows, slot, None], fmt, sdtype)
        buggy += expert_forward(shared, x, None, fmt, sdtype)
        check_moe(impl, impl(x, weights, indices, experts, shared, fmt, sdtype), expected, experts, shared, x,
                  weights, indices, fmt, sdtype)  # fmt: skip
        with pytest.raises(AssertionError):
            check_moe(impl, buggy, expected, experts, shared, x, weights, indices, fmt, sdtype)


def _bug(experts, shared, bug):
    """The weights a buggy kernel would effectively read."""

    def bump(s, where):
        s = s.view(torch.uint8).clone()
        s[where] += 1
        return s.view(torch.float8_e8m0fnu)

    def drop(s, where):
        s = s.view(torch.uint8).clone()
        s[where] = 127
        return s.view(torch.float8_e8m0fnu)

    if bug == "wrong scale exponent":  # one 32-block scale of every routed w2 one binade too high
        return [ExpertWeights(e.w1, (e.w2[0], bump(e.w2[1], (slice(None), 1))), e.w3, e.swiglu_limit) for e in experts]
    if bug == "dropped block scale":  # the shared expert's first w1 block scale read as 1.0
        return experts, ExpertWeights((shared.w1[0], drop(shared.w1[1], (0, 0))), shared.w2, shared.w3, 10.0)
    # off-by-one group: every token's rows computed with the next expert's weights
    return experts[1:] + experts[:1], shared


@pytest.mark.parametrize("bug", ["wrong scale exponent", "dropped block scale", "off-by-one expert group"])
def test_planted_weight_bugs_are_caught(impl, ref_model, tiny_args, bug):
    if bug == "wrong scale exponent" and impl.backend != "torch" and DEV == "cuda":
        # measured (this test's inputs, the GPU allowance replayed on the CPU): the bound's mean per element is 1.99,
        # the bug moves outputs by at most 1.29. The bound is sound: the MMA's 2^-12 block error can move the SwiGLU
        # intermediate across an e4m3 rounding step (or its group's power-of-two scale), and each such flip counts
        # at its worst through |w2|. The other two planted bugs stay visible on the GPU; the row-level verdict
        # catches this class there (selftest fp4-scale-bias-lost, caught on the H200)
        pytest.skip("on the GPU the FP8 re-quantization span of the expert intermediate covers one w2 block scale "
                    "one binade off (mean bound 1.99 vs the bug's largest change 1.29)")  # fmt: skip
    moe = ref_model.layers[3].ffn
    experts, shared = weights_of(moe)
    x, ids = tokens(3)
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, (0, 3))
        expected = reference(experts, shared, x, weights, indices, fmt, sdtype)
        planted = _bug(experts, shared, bug)
        planted = planted if isinstance(planted, tuple) else (planted, shared)
        buggy = impl(x, weights, indices, *planted, fmt, sdtype)
        with pytest.raises(AssertionError):
            check_moe(impl, buggy, expected, experts, shared, x, weights, indices, fmt, sdtype)


# ---- the Triton kernels' own paths ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_moe():
    resolve_ops(OpsConfig(overrides=((OP, "triton"),)))  # sets the backend up (interpreter on CPU)
    from parity.optimized.ops.triton import moe_experts as module

    return module


def layer1_batch(ref_model, t):
    """(experts, shared, x, weights, indices) of the tiny model's layer-1 MoE routing t tokens (call under the
    bf16 default dtype, as the routing runs)."""
    moe = ref_model.layers[1].ffn
    experts, shared = weights_of(moe)
    x, ids = tokens(t)
    weights, indices = route(moe, x, ids, (0, t))
    return experts, shared, x, weights, indices


@pytest.mark.parametrize("split", [False, True])
def test_triton_writes_every_output(triton_moe, ref_model, tiny_args, monkeypatch, split):
    # outputs, the sorted-row buffers and a split launch's chunk sums start as NaN: a tile, row, expert or chunk the
    # kernels skip would show
    from parity.optimized.ops.triton import _gemm_common

    with ref.default_dtype(torch.bfloat16):
        experts, shared, x, weights, indices = layer1_batch(ref_model, 5)
        clean = triton_moe.moe_experts(x, weights, indices, experts, shared, *policy(tiny_args), _split=split)
        monkeypatch.setattr(_gemm_common, "POISON", True)
        poisoned = triton_moe.moe_experts(x, weights, indices, experts, shared, *policy(tiny_args), _split=split)
    assert not poisoned.isnan().any() and torch.equal(poisoned, clean)


def test_triton_down_tile_of_128_features_on_4_warps_only_for_16_row_tiles(triton_moe, monkeypatch):
    # that config spills at 32-row token tiles when compiled for sm_90 (bench/triton_gemm.py --compile-check moe):
    # the pruner must keep it from those launches and offer it to 16-row ones
    monkeypatch.setattr(triton_moe.runtime, "interpreting", lambda: False)
    configs = triton_moe._configs(256, gate_up=False)

    def shapes(cs):
        return [(c.kwargs["BLOCK_W"], c.num_warps) for c in cs]

    assert shapes(triton_moe._down_prune(configs, {}, BLOCK_T=16)) == shapes(configs)
    assert (128, 4) in shapes(configs)
    assert shapes(triton_moe._down_prune(configs, {}, BLOCK_T=32)) == [s for s in shapes(configs) if s != (128, 4)]


def test_triton_plan_tiles_every_routed_row_once(triton_moe):
    # the tile plan: every (token, slot) pair in exactly one tile of its own expert, tokens ascending inside an
    # expert, no tile for an empty expert, the shared expert's tiles after the routed ones
    g = torch.Generator().manual_seed(0)
    t, k, n_exp, bt = 45, 3, 16, 8
    indices = torch.stack([torch.randperm(n_exp, generator=g)[:k] for _ in range(t)])
    indices[indices == 5] = 6  # expert 5 empty (a token may now hold 6 twice: pairs still counted once each)
    weights = torch.rand(t, k, generator=g)
    # on the kernels' device (a CUDA kernel cannot read CPU tensors), the checks on the CPU
    plan, row_tok, row_w, pos = (a.cpu() for a in triton_moe._plan(indices.to(DEV), weights.to(DEV), n_exp, t, bt))
    seen = []
    for e, r0, n in plan.T.tolist():
        if n == 0:
            continue
        assert 0 < n <= bt and e != 5
        rows = list(range(r0, r0 + n))
        if e == n_exp:
            assert rows == list(range(t * k + r0 - t * k, t * k + r0 - t * k + n))
            continue
        toks = row_tok[rows].tolist()
        assert toks == sorted(toks)
        pairs = [tok * k + int((indices[tok] == e).nonzero()[0]) for tok in toks]
        assert all(int(indices.view(-1)[p]) == e for p in pairs)
        seen += rows
    assert sorted(seen) == list(range(t * k))
    assert torch.equal(row_w[: t * k], weights.view(-1)[torch.argsort(indices.view(-1), stable=True)])
    # pos lists each token's rows in ascending expert id
    order = torch.argsort(indices.view(-1), stable=True)
    for tok in range(t):
        experts_of_rows = indices.view(-1)[order[pos[tok].long()]]
        assert experts_of_rows.tolist() == sorted(indices[tok].tolist())


def _shifted(t: torch.Tensor, elements: int) -> torch.Tensor:
    """A copy of t whose storage begins `elements` elements into a fresh buffer (an address no multiple of 16
    elements away from another tensor's, for elements in 1..15)."""
    size = t.element_size()
    buf = torch.empty((t.numel() + elements) * size, dtype=torch.uint8, device=t.device)
    out = buf[elements * size :]
    out.copy_(t.contiguous().view(torch.uint8).reshape(-1))
    return out.view(t.dtype).view(t.shape)


def test_triton_unaligned_expert_tensors_give_the_same_bits(triton_moe, ref_model, tiny_args):
    # the kernels are told expert offsets are multiples of 16 elements only when the host checked every one: experts
    # at odd offsets take the other compiled variant (byte loads) and must give the same bits
    moe = ref_model.layers[1].ffn
    experts, shared = weights_of(moe)
    moved = [
        ExpertWeights(*((_shifted(w, 1 + i % 7), _shifted(s, 3)) for w, s in (e.w1, e.w2, e.w3)), e.swiglu_limit)
        for i, e in enumerate(experts)
    ]
    _, aligned = triton_moe._offset_table(experts, (("w1", 0), ("w3", 0), ("w1", 1), ("w3", 1)))
    _, moved_aligned = triton_moe._offset_table(moved, (("w1", 0), ("w3", 0), ("w1", 1), ("w3", 1)))
    assert not moved_aligned, "the shifted experts should not pass the alignment check"
    x, ids = tokens(7)
    with ref.default_dtype(torch.bfloat16):
        weights, indices = route(moe, x, ids, (0, 7))
        want = triton_moe.moe_experts(x, weights, indices, experts, shared, *policy(tiny_args))
        got = triton_moe.moe_experts(x, weights, indices, moved, shared, *policy(tiny_args))
    assert torch.equal(got, want), f"aligned tables: {aligned}"


@pytest.mark.parametrize(
    "t, k, n_exp, bt, case",
    [(1, 1, 4, 16, "one row"), (1, 6, 16, 16, "one token"), (45, 3, 16, 8, "empty expert, repeats"),
     (64, 6, 256, 16, "decode batch"), (7, 6, 384, 32, "Pro experts"), (170, 6, 16, 32, "at the row limit"),
     (9, 2, 3, 4, "one expert for all")],
)  # fmt: skip
def test_triton_plan_one_launch_equals_the_torch_plan(triton_moe, t, k, n_exp, bt, case):
    # the one-program plan kernel and its twin, the torch ops: the same four tensors, element for element
    g = torch.Generator().manual_seed(t * 131 + n_exp)
    indices = torch.stack([torch.randperm(n_exp, generator=g)[: min(k, n_exp)] for _ in range(t)])
    if case == "empty expert, repeats":
        indices[indices == 5] = 6
    if case == "one expert for all":
        indices[:] = 1
    weights = torch.rand(t, indices.shape[1], generator=g).to(DEV)
    indices = indices.to(DEV)  # the kernel's device: a CUDA kernel cannot read CPU tensors
    got = triton_moe._plan_one_launch(indices, weights, n_exp, t, bt)
    want = triton_moe._plan_torch(indices, weights, n_exp, t, bt)
    for name, a, b in zip(("plan", "row_tok", "row_w", "pos"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("t", [1, 7])
def test_triton_power_of_two_scaling_gives_the_twins_bits(impl, ref_model, tiny_args, t):
    # _mm_fp4's POW2 form (C / sa carried, one fma per block) against the twin's (P * sa) * sb form, forced: the
    # same bits (powers of two commute with rounding); and scale_fmt None (fp32 scales, the twin's form) is judged
    # against the twin like every other case
    if impl.backend != "triton":
        pytest.skip("the POW2 form is the triton kernel's")
    from parity.optimized.ops.triton import moe_experts as module

    fmt, sdtype = policy(tiny_args)
    assert fmt == "ue8m0"
    with ref.default_dtype(torch.bfloat16):
        experts, shared, x, weights, indices = layer1_batch(ref_model, t)
        fast = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype)
        plain = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _pow2=False)
        assert torch.equal(fast, plain)
        out = impl(x, weights, indices, experts, shared, None, torch.float32)
        expected = reference(experts, shared, x, weights, indices, None, torch.float32)
    assert not torch.equal(out, fast)  # the fp32-scale policy really ran another quantization
    check_moe(impl, out, expected, experts, shared, x, weights, indices, None, torch.float32)


def test_triton_pairs_order_is_each_runs_even_then_odd_elements(triton_moe):
    # the order the FP4 tiles read quantized activations in: a packed byte's low / high nibble pairs with them
    from parity.optimized.ops.triton._gemm_common import pairs_order

    q = torch.arange(3 * 64, dtype=torch.int64).remainder(256).to(torch.uint8).view(3, 64)
    got = pairs_order(q.view(torch.float8_e4m3fn)).view(torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == (3, 64) and got.is_contiguous()
    run = list(range(0, 32, 2)) + list(range(1, 32, 2))
    want = torch.tensor([[64 * r + 32 * j + c for j in range(2) for c in run] for r in range(3)]).remainder(256)
    assert torch.equal(got.long(), want)


@pytest.mark.parametrize("t", [1, 7, 37])
def test_triton_split_k_gives_the_same_bits(triton_moe, ref_model, tiny_args, t, monkeypatch):
    # decode-sized launches split K over its chunks (the last program of a tile adds the chunk sums in order): the
    # K-only chunking makes a split launch's bits those of the unsplit one, whatever the batch
    from parity.optimized.ops.triton import _gemm_common

    module = triton_moe
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        experts, shared, x, weights, indices = layer1_batch(ref_model, t)
        whole = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _split=False)
        split = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _split=True)
        assert torch.equal(split, whole)
        assert not _gemm_common.tile_counters(x.device, 1).any()  # every arrival counter back to 0
        # planted: a split launch that leaves its last chunk out (where K has more than one: the tiny model's D; a
        # launch of no programs would leave its output buffer as the allocator returns it)
        real = module.k_chunk
        monkeypatch.setattr(module, "k_chunk", lambda k: (real(k)[0], max(1, real(k)[1] - 1)))
        short = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _split=True)
    assert not torch.equal(short, whole)


def fp4_experts(n, inter, dim, limit, seed=7):
    """Routed experts in the V4-Pro/Flash layout at other sizes than the tiny model's: packed e2m1 with per-32 e8m0
    scales."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        packed, s = quantize_fp4_groups(torch.randn(o, i, generator=g) * i**-0.5)
        return packed.view(torch.float4_e2m1fn_x2).to(DEV), s.to(DEV)

    return [ExpertWeights(lin(inter, dim), lin(dim, inter), lin(inter, dim), limit) for _ in range(n)]


@pytest.mark.parametrize("t", [1, 5])
def test_triton_split_k_over_eight_chunks_of_two_trips(impl, tiny_args, t):
    # D 2048: the gate-up's K in 8 chunks of two 128-K trips, the down's (inter 256) in 2 (the tiny model has 2 and
    # 1, of one trip each): split against unsplit bit for bit, the power-of-two form (C / sa carried across a
    # chunk's trips) against the twin's form bit for bit, and the split launch against the twin. (The chunk sums
    # added in another order moved no output bit here: fp32-level, below the bf16 outputs; a dropped chunk fails
    # the test above.)
    if impl.backend != "triton":
        pytest.skip("split-K is the triton kernels'")
    from parity.optimized.ops.triton import moe_experts as module

    dim, inter, n_exp = 2048, 256, 4
    assert module.k_chunk(dim) == (256, 8) and module.k_chunk(inter) == (128, 2)
    experts = fp4_experts(n_exp, inter, dim, tiny_args.swiglu_limit)
    shared = fp8_experts(1, inter, dim, tiny_args.swiglu_limit, seed=9)[0]
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, dim, generator=g).to(torch.bfloat16).to(DEV)
    indices = torch.stack([torch.randperm(n_exp, generator=g)[:2] for _ in range(t)]).to(DEV)
    weights = (torch.rand(t, 2, generator=g) * 1.5).to(DEV)
    fmt, sdtype = policy(tiny_args)
    with ref.default_dtype(torch.bfloat16):
        whole = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _split=False)
        split = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _split=True)
        assert torch.equal(split, whole)
        plain = module.moe_experts(x, weights, indices, experts, shared, fmt, sdtype, _pow2=False)
        assert torch.equal(plain, whole)
        expected = reference(experts, shared, x, weights, indices, fmt, sdtype)
    check_moe(impl, split, expected, experts, shared, x, weights, indices, fmt, sdtype)

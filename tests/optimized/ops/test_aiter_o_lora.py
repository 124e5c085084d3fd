"""o_lora on aiter's batched FP8 GEMM (ATOM PR #676): the kernel against its own math, and the scale collapse
measured against the reference twin.

The aiter path is not the twin's math (parity/optimized/ops/aiter/o_lora.py): activations are quantized per (token,
128-group) in the kernel and wo_a is requantized with ONE per-tensor scale. So it is judged twice:
1. against `reference_math`, the same FP8 roundings replayed with exact sums: within an fp32 accumulation allowance
   plus 1 bf16 ulp (a kernel bug, a wrong scale, a wrong group fails here);
2. against the twin (the bf16 einsum) and the float64 golden: within the analytic bound of two e4m3 roundings (half
   a step, 2^-4 relative, or the subnormal step) of every product; and the loss is measured and must be visible
   (it is the question this backend answers, not noise to hide).
Shapes are the ones of test_o_lora.py (same layouts, ragged cases); run under TRITON_INTERPRET=1 on CPU.
"""

import pytest
import torch

from parity.optimized.ops import OpsConfig, registry, resolve_ops
from parity.optimized.ops.aiter import loader
from tests.optimized.ops.conftest import BackendImpl
from tests.optimized.ops.gemm_check import check_gemm, fp8_block_allowance, fp32_sum_allowance
from tests.optimized.ops.test_o_lora import LAYOUTS, activations, cu_of, reference, weight

OP = "o_lora"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
_OK, _WHY = loader.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"aiter backend unavailable: {_WHY}")

CASES = [
    ((1,), "tiny"), ((2,), "g4-r64"), ((5,), "g1-r32"), ((63,), "g8-r16"), ((129,), "tiny"), ((37, 1, 63), "g4-r64")
]  # fmt: skip
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]
E4M3_HALF_STEP = 2.0**-4  # RNE to 3 mantissa bits: relative error at most half a step
E4M3_SUBNORMAL_HALF_STEP = 2.0**-10  # absolute, in units of the scale (smallest subnormal 2^-9)


@pytest.fixture(scope="module")
def aiter_impl() -> BackendImpl:
    ops = resolve_ops(OpsConfig(overrides=((OP, "aiter"),)))
    return BackendImpl(OP, "aiter", registry()[OP]["aiter"], ops.o_lora)


@pytest.fixture(scope="module")
def mod():
    from parity.optimized.ops.aiter import o_lora

    return o_lora


def replay(mod, o, wo_a, g):
    """(bf16 replay, float64 golden of the same roundings, fp32 accumulation allowance) of the aiter math."""
    wq, ws = mod.per_tensor_fp8(wo_a.cpu(), g)
    t = o.shape[0]
    ov = o.cpu().view(t, g, -1)
    acc = mod.reference_math(ov, wq, ws)
    # the same quantized operands with float64 sums and scalings: what acc approximates
    k = ov.shape[-1]
    golden = torch.zeros(acc.shape, dtype=torch.float64)
    abs_sum = torch.zeros(acc.shape, dtype=torch.float64)
    for k0 in range(0, k, mod.GROUP):
        a = ov[..., k0 : k0 + mod.GROUP].float()
        a_s = a.abs().amax(-1, keepdim=True).clamp_min(1e-10) * torch.tensor(1 / mod.FP8_MAX, dtype=torch.float32)
        q = (a * (1.0 / a_s)).clamp(-mod.FP8_MAX, mod.FP8_MAX).to(mod.FP8).double()
        w = wq[..., k0 : k0 + mod.GROUP].double()
        golden += torch.einsum("tgk,grk->tgr", q, w) * a_s.double()
        abs_sum += torch.einsum("tgk,grk->tgr", q.abs(), w.abs()) * a_s.double()
    golden, abs_sum = golden * ws.double(), abs_sum * ws.double()
    n_groups = -(-k // mod.GROUP)
    allowance = fp32_sum_allowance(abs_sum, mod.GROUP) + fp8_block_allowance(abs_sum, n_groups, DEV)
    return acc.to(torch.bfloat16).to(o.device), golden.to(o.device), allowance.to(o.device)


def fp8_loss_bound(mod, o, wo_a, g, rank):
    """Analytic bound of |aiter - float64 einsum| from the two e4m3 roundings (RNE, saturating at 448 exactly by
    construction): per product |a w| * (2^-4 + 2^-4 + 2^-8) plus the subnormal steps, plus fp32 sums."""
    t = o.shape[0]
    a = o.double().view(t, g, -1)
    w = wo_a.double().view(g, rank, -1)
    _, ws = mod.per_tensor_fp8(wo_a.cpu(), g)
    # each activation's group scale amax / 448, broadcast back over its group
    blocks = a.split(mod.GROUP, dim=-1)
    a_s = torch.cat([b.abs().amax(-1, keepdim=True).expand_as(b) for b in blocks], dim=-1) / mod.FP8_MAX
    ea = E4M3_HALF_STEP * a.abs() + E4M3_SUBNORMAL_HALF_STEP * a_s
    ew = E4M3_HALF_STEP * w.abs() + E4M3_SUBNORMAL_HALF_STEP * float(ws)
    bound = torch.einsum("tgk,grk->tgr", ea, w.abs()) + torch.einsum("tgk,grk->tgr", a.abs() + ea, ew)
    golden = torch.einsum("tgk,grk->tgr", a, w)
    abs_sum = torch.einsum("tgk,grk->tgr", a.abs(), w.abs())
    return golden, bound * (1 + 2.0**-10) + fp32_sum_allowance(abs_sum, a.shape[-1])


@pytest.mark.parametrize(("lengths", "layout"), PARAMS)
def test_matches_its_own_fp8_math(aiter_impl, mod, ref_model, lengths, layout):
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    cu = cu_of(lengths)
    o = activations(cu[-1], hd)
    out = aiter_impl(o, wo_a, g, rank, cu)
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], g, rank)
    check_gemm(aiter_impl, out, *replay(mod, o, wo_a, g))


@pytest.mark.parametrize(("lengths", "layout"), PARAMS)
def test_distance_to_the_twin_is_the_fp8_roundings(aiter_impl, mod, ref_model, lengths, layout):
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    cu = cu_of(lengths)
    o = activations(cu[-1], hd)
    out = aiter_impl(o, wo_a, g, rank, cu).double()
    twin = torch.cat([reference(o[a:b], wo_a, g, rank) for a, b in zip(cu[:-1], cu[1:])]).double()
    golden, bound = fp8_loss_bound(mod, o, wo_a, g, rank)
    ulp = (golden.abs().float().to(torch.bfloat16).double() * 2.0**-7).clamp_min(2.0**-133)
    excess = (out - golden).abs() - bound - ulp
    bad = int((excess > 0).sum())
    assert bad == 0, f"{bad} elements beyond two e4m3 roundings (worst by {excess.max():.3g})"
    # the loss is real and larger than the twin's own rounding: a path that silently ran the bf16 einsum fails here
    assert (out - golden).abs().max() > 4 * (twin - golden).abs().max()


def test_scale_collapse_on_the_checkpoint_weight_is_measured(aiter_impl, mod, ref_model, capsys):
    # the tiny checkpoint's wo_a (layer 2): what the collapse does to the weight and to the op output, printed (run
    # with -s) and bounded; docs/aiter.md records the numbers of this test and of the parity run
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny").cpu()
    wq, ws = mod.per_tensor_fp8(wo_a, g)
    deq = wq.view(g * rank, -1).double() * float(ws)
    w = wo_a.double()
    rows, cols = range(0, w.shape[0], 128), range(0, w.shape[1], 128)
    blocks = [(slice(r, r + 128), slice(c, c + 128)) for r in rows for c in cols]
    rel_block = [float((deq[b] - w[b]).abs().max() / w[b].abs().max()) for b in blocks]
    changed = float((deq != w).double().mean())
    o = activations(257, hd).cpu()
    # the kernel runs where the backend runs (the GPU on a CUDA machine, the interpreter elsewhere); the math here on
    # the host in float64
    out = aiter_impl(o.to(DEV), wo_a.to(DEV), g, rank, (0, 257)).double().cpu()
    twin = reference(o, wo_a, g, rank).double()
    golden = torch.einsum("sgd,grd->sgr", o.double().view(257, g, -1), w.view(g, rank, -1))
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), twin.flatten(), dim=0))
    err, twin_err = float((out - golden).abs().max()), float((twin - golden).abs().max())
    with capsys.disabled():
        print(
            f"\n[o_lora/aiter scale collapse, tiny wo_a {tuple(wo_a.shape)}] weight elements changed {changed:.3f}, "
            f"worst per-block relative error {max(rel_block):.3g} (blocks {len(rel_block)}); output cos vs twin "
            f"{cos:.6f}, max|aiter - golden| {err:.3g} vs max|twin - golden| {twin_err:.3g}"
        )
    assert max(rel_block) <= E4M3_HALF_STEP + 2.0**-20 and 0.99 < cos < 1.0 and err > twin_err


def test_per_tensor_conversion_is_exact_rne_and_idempotent(mod, ref_model):
    w = weight(ref_model, "tiny").cpu()
    wq, ws = mod.per_tensor_fp8(w, 2)
    assert wq.dtype == torch.float8_e4m3fn and wq.shape == (2, 128, 256) and ws.shape == (1,)
    assert ws.dtype == torch.float32 and float(ws) == float(w.float().abs().amax() / 448)
    assert wq.float().abs().max() == 448  # the largest weight lands on the top code
    # every code is the nearest e4m3 value of w / s (ties to even): no other code is closer
    x = (w.float() / ws).view(2, 128, 256).double()
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    codes = codes[codes.isfinite()]
    nearest = (x[..., None] - codes).abs().min(-1).values
    assert torch.equal((x - wq.double()).abs(), nearest)
    # a weight that is already e4m3 codes times a power of two, top code 448, comes back bit for bit
    exact = (wq.view(256, 256).float() * 2.0**-8).to(torch.bfloat16)
    wq2, ws2 = mod.per_tensor_fp8(exact, 2)
    assert float(ws2) == 2.0**-8 and torch.equal(wq2.view(torch.uint8), wq.view(torch.uint8))


def test_the_weight_is_converted_once_per_tensor_and_version(aiter_impl, mod, ref_model, monkeypatch):
    calls = []
    real = mod.per_tensor_fp8
    monkeypatch.setattr(mod, "per_tensor_fp8", lambda w, g: calls.append(1) or real(w, g))
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny").clone()
    o = activations(5, hd)
    first = mod.o_lora(o, wo_a, g, rank)
    assert torch.equal(mod.o_lora(o, wo_a, g, rank), first) and len(calls) == 1
    with torch.no_grad():
        wo_a.mul_(2)  # a new version: the cached conversion must not be reused
    assert torch.equal(mod.o_lora(o, wo_a, g, rank).float(), 2 * first.float()) and len(calls) == 2


def test_kernel_writes_every_output(mod, ref_model):
    g, rank, hd = LAYOUTS["g4-r64"]
    wo_a = weight(ref_model, "g4-r64")
    o = activations(129, hd)
    clean = mod.o_lora(o, wo_a, g, rank)
    bmm = loader.load(
        "aiter.ops.triton.batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant",
        "batched_gemm_a8w8_a_per_token_group_prequant_w_per_batched_tensor_quant",
    )
    wq, ws = mod.per_tensor_fp8(wo_a, g)
    out = torch.full_like(clean, float("nan"))
    bmm(o.view(129, g, -1), wq, ws, group_size=128, YQ=out, transpose_bm=True, transpose_bm_in=True)
    assert not out.isnan().any() and torch.equal(out, clean)


@pytest.mark.parametrize("bug", ["weight scale doubled", "activation group 64", "groups swapped"])
def test_planted_bugs_are_caught(aiter_impl, mod, ref_model, monkeypatch, bug):
    g, rank, hd = LAYOUTS["g4-r64"]
    wo_a = weight(ref_model, "g4-r64")
    o = activations(63, hd)
    want = replay(mod, o, wo_a, g)
    real = mod.per_tensor_fp8
    if bug == "weight scale doubled":
        monkeypatch.setattr(mod, "per_tensor_fp8", lambda w, n: (real(w, n)[0], real(w, n)[1] * 2))
    elif bug == "activation group 64":
        monkeypatch.setattr(mod, "GROUP", 64)
    else:
        # rolled as bytes: CUDA has no roll for float8 tensors
        roll = lambda q: q.view(torch.uint8).roll(1, 0).view(q.dtype)  # noqa: E731
        monkeypatch.setattr(mod, "per_tensor_fp8", lambda w, n: (roll(real(w, n)[0]), real(w, n)[1]))
    buggy = mod.o_lora(o, wo_a.clone(), g, rank)  # a clone: a fresh cache entry
    with pytest.raises(AssertionError):
        check_gemm(aiter_impl, buggy, *want)

"""o_lora: grouped output LoRA (wo_a), per group g `o[T, g, :] . wo_a[g]^T` in bf16.

Twin: `parity.reference.model.Attention.forward`, `torch.einsum("bsgd,grd->bsgr", o, wo_a.view(g, rank, -1))` on
one request's `[1, s, g, h*d/g]` attention output. The op runs one einsum per segment (cuBLAS picks its bf16
kernel by shape); on CPU rows are independent, so a single segment over the whole batch also matches here.

The Triton backend reads wo_a as FP8 with 128x128 block scales recovered from the bf16 weight (the checkpoint's
FP8 dequantized exactly at load): the recovery is proven here on the synthetic checkpoint and on edge-case blocks.
Backends that are not bitwise are judged by `gemm_check.check_gemm` (fp32 accumulation allowance).
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from parity.checkpoint.reader import Checkpoint
from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks
from parity.optimized.ops import OpsConfig, resolve_ops
from tests.optimized.ops.gemm_check import check_gemm, fp32_sum_allowance
from tests.optimized.ops.ptx_exec import all_byte_words, run_ptx

OP = "o_lora"
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (groups, rank, h*d): the tiny model's wo_a (2 groups of 2 heads x 128, rank 128) and synthetic layouts, made from
# FP8 blocks like a checkpoint's (g4-r64 and g8-r16: 128-row scale blocks straddle groups; g4/g1: K per group 96
# and 192, not multiples of 128; g2-k1024: K per group 1024, eight 128-column scale blocks; g2-r128-k1024: the same
# with rank 128, each group one 128-row scale block: the kernel's one-scale-per-tile path)
LAYOUTS = {
    "tiny": (2, 128, 512),
    "g4-r64": (4, 64, 384),
    "g1-r32": (1, 32, 192),
    "g8-r16": (8, 16, 512),
    "g2-k1024": (2, 64, 2048),
    "g2-r128-k1024": (2, 128, 2048),
}
CASES = [
    ((1,), "tiny"),
    ((2,), "g4-r64"),
    ((5,), "g1-r32"),
    ((7,), "tiny"),
    ((37,), "tiny"),
    ((63,), "g8-r16"),
    ((64,), "tiny"),
    ((129,), "tiny"),
    ((1000,), "tiny"),
    ((1, 2, 5), "tiny"),
    ((37, 1, 63), "g4-r64"),
    ((2, 5, 1, 3, 1), "tiny"),
    ((1, 1, 1), "g8-r16"),
    ((1, 7, 2), "g2-k1024"),
    ((65,), "g2-k1024"),
    ((1, 64, 3), "g2-r128-k1024"),
]
PARAMS = [pytest.param(*c, id="L{}-{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def skip_not_the_twins_math(impl):
    if impl.backend == "aiter":
        pytest.skip(
            "aiter's o_lora adds two FP8 roundings by design (the scale collapse): judged against its own math and "
            "its distance to this twin measured in test_aiter_o_lora.py, on these layouts"
        )


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def fp8_made(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight as a checkpoint's FP8 wo_a becomes after convert.py: FP8 blocks dequantized exactly."""
    return dequantize_fp8_blocks(*quantize_fp8_blocks(w.float())).to(torch.bfloat16)


def weight(ref_model, layout):
    g, rank, hd = LAYOUTS[layout]
    if layout == "tiny":
        attn = ref_model.layers[2].attn
        assert (attn.n_groups, attn.o_lora_rank) == (g, rank)
        return attn.wo_a.weight.detach().to(DEV)
    return fp8_made(torch.randn(g * rank, hd // g) * (hd // g) ** -0.5).to(DEV)


def activations(t, hd):
    return torch.randn(t, hd).to(torch.bfloat16).to(DEV)


def reference(o, wo_a, g, rank):
    # one request: o [s, h*d] -> [1, s, g, h*d/g], as in ref.Attention.forward
    return torch.einsum("bsgd,grd->bsgr", o[None].view(1, o.shape[0], g, -1), wo_a.view(g, rank, -1))[0]


def golden_and_allowance(o, wo_a, g, rank):
    od, wd = o.double().view(o.shape[0], g, -1), wo_a.double().view(g, rank, -1)
    golden = torch.einsum("sgd,grd->sgr", od, wd)
    return golden, fp32_sum_allowance(torch.einsum("sgd,grd->sgr", od.abs(), wd.abs()), wd.shape[-1])


@pytest.mark.parametrize(("lengths", "layout"), PARAMS)
def test_ragged_matches_reference_per_sequence(impl, ref_model, lengths, layout):
    skip_not_the_twins_math(impl)
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    cu = cu_of(lengths)
    o = activations(cu[-1], hd)
    out = impl(o, wo_a, g, rank, cu)
    expected = torch.cat([reference(o[a:b], wo_a, g, rank) for a, b in zip(cu[:-1], cu[1:])])
    assert out.dtype == torch.bfloat16 and out.shape == (cu[-1], g, rank)
    check_gemm(impl, out, expected, *golden_and_allowance(o, wo_a, g, rank))


@pytest.mark.parametrize("layout", ["tiny", "g8-r16"])
def test_rows_do_not_depend_on_batchmates_or_position(impl, ref_model, layout):
    g, rank, hd = LAYOUTS[layout]
    wo_a = weight(ref_model, layout)
    a = activations(37, hd)
    alone = impl(a, wo_a, g, rank, (0, 37))
    for before, after in ((5, 1), (0, 63), (129, 0), (1, 1)):
        o = torch.cat([activations(before, hd), a, activations(after, hd)])
        n = before + 37 + after
        assert torch.equal(impl(o, wo_a, g, rank, (0, n))[before : before + 37], alone)


def test_planted_bug_transposed_group_weight_is_caught(impl, ref_model):
    skip_not_the_twins_math(impl)
    # a kernel that reads wo_a as [g, in, rank] (the transposed layout of each group) must fail the comparison
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny")
    o = activations(63, hd)
    buggy = torch.einsum("sgd,gdr->sgr", o.view(63, g, -1), wo_a.view(g, -1, rank))
    expected = reference(o, wo_a, g, rank)
    check_gemm(impl, impl(o, wo_a, g, rank, (0, 63)), expected, *golden_and_allowance(o, wo_a, g, rank))
    with pytest.raises(AssertionError):
        check_gemm(impl, buggy, expected, *golden_and_allowance(o, wo_a, g, rank))


# ---- the Triton kernel: FP8 weights recovered from the bf16 wo_a -------------------------------------------------


@pytest.fixture(scope="module")
def triton_o_lora():
    resolve_ops(OpsConfig(overrides=(("o_lora", "triton"),)))  # sets the backend up (interpreter on CPU)
    from parity.optimized.ops.triton import o_lora as module

    return module


def assert_recovers(got, q, s):
    """The recovered (e4m3, e8m0) pair against the checkpoint's: the same bytes and scale in every 128x128 block,
    except a block whose largest |q| is exactly 224, which must come back as the value-identical (2q, s/2)."""
    assert got is not None, "an FP8-made weight must be recognized as one"
    gq, gs = got
    n, k = q.shape
    for i, j in itertools.product(range(s.shape[0]), range(s.shape[1])):
        rows, cols = slice(128 * i, min(n, 128 * (i + 1))), slice(128 * j, min(k, 128 * (j + 1)))
        bq, bs, rq, rs = q[rows, cols], s[i, j].view(torch.uint8), gq[rows, cols], gs[i, j].view(torch.uint8)
        if bq.float().abs().max() == 224:
            assert rs == bs - 1 and torch.equal(rq.float(), 2 * bq.float()), (i, j)
        else:
            assert rs == bs and torch.equal(rq.view(torch.uint8), bq.view(torch.uint8)), (i, j)


def test_recovers_the_checkpoints_fp8_weights(triton_o_lora, ref_model, tiny_ckpt, tiny_args):
    # every wo_a of the synthetic checkpoint (main layers and MTP), from the bf16 parameter the model loaded
    # (convert.py's exact dequantization) back to the on-disk e4m3 bytes and e8m0 scales
    ckpt = Checkpoint(tiny_ckpt)
    names = [n for n in ckpt.weight_map if n.endswith("attn.wo_a.weight")]
    assert len(names) == tiny_args.n_layers + tiny_args.n_mtp_layers
    for name in names:
        with safe_open(str(tiny_ckpt / ckpt.weight_map[name]), "pt") as f:
            disk_w, disk_s = f.get_tensor(name), f.get_tensor(name[: -len("weight")] + "scale")
        param = ref_model.get_parameter(name)
        assert param.dtype == torch.bfloat16
        assert_recovers(triton_o_lora.quantize_wo_a(param), disk_w, disk_s)


def test_recovers_edge_case_blocks(triton_o_lora):
    # blocks the recipe makes at its edges: largest |q| exactly 224 (the ambiguous case) and exactly 448, all zero,
    # below the 1e-4 amax floor, -0.0 entries, e4m3 subnormals next to a large amax, a partial block (rows and
    # columns not multiples of 128)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 400, generator=g)
    w[:128, :128] *= 2.0**-20  # below the 1e-4 floor
    w[128:256, :128] = 0.0
    w[128, 5] = -0.0
    w[:128, 128:256] *= 226 * 2.0**-7 / w[:128, 128:256].abs().max()  # master amax 226 * 2^-7: stored as 224 * 2^-7
    w[128:256, 128:256] *= 440 * 2.0**-8 / w[128:256, 128:256].abs().max()  # stored as 448 * 2^-8, same values
    w[:128, 256:] *= 448 * 2.0**-3 / w[:128, 256:].abs().max()
    w[128:256, 300] = 2.0**-12 * w[128:256, 256:].abs().max()  # e4m3 subnormals of their block
    w[256:, :] *= 2.0**10
    q, s = quantize_fp8_blocks(w)
    assert q[:128, 128:256].float().abs().max() == 224 and q[128:256, 128:256].float().abs().max() == 448
    assert_recovers(triton_o_lora.quantize_wo_a(dequantize_fp8_blocks(q, s).to(torch.bfloat16)), q, s)


def test_a_weight_that_is_not_fp8_falls_back_to_bf16_loudly(triton_o_lora):
    # random bf16 weights are not e4m3 x 2^k per block: the kernel must not round them, it reads them as bf16
    g, rank, hd = LAYOUTS["g4-r64"]
    wo_a = (torch.randn(g * rank, hd // g) * 0.1).to(torch.bfloat16).to(DEV)
    assert triton_o_lora.quantize_wo_a(wo_a) is None
    o = activations(37, hd)
    with pytest.warns(UserWarning, match="not an FP8 weight"):
        out = triton_o_lora.o_lora(o, wo_a, g, rank)
    impl = _triton_impl()
    check_gemm(impl, out, reference(o, wo_a, g, rank), *golden_and_allowance(o, wo_a, g, rank))


def test_the_fp8_weight_is_made_once_per_tensor_and_version(triton_o_lora, ref_model, monkeypatch):
    calls = []
    real = triton_o_lora.quantize_wo_a
    monkeypatch.setattr(triton_o_lora, "quantize_wo_a", lambda w: calls.append(1) or real(w))
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny").clone()
    o = activations(5, hd)
    first = triton_o_lora.o_lora(o, wo_a, g, rank)
    assert torch.equal(triton_o_lora.o_lora(o, wo_a, g, rank), first) and len(calls) == 1
    with torch.no_grad():
        wo_a.mul_(2)  # an in-place update bumps the version: the cached FP8 weight must not be reused
    doubled = triton_o_lora.o_lora(o, wo_a, g, rank)
    assert len(calls) == 2 and torch.equal(doubled.float(), 2 * first.float())


def _triton_impl():
    from parity.optimized.ops import registry
    from tests.optimized.ops.conftest import BackendImpl

    ops = resolve_ops(OpsConfig(overrides=((OP, "triton"),)))
    return BackendImpl(OP, "triton", registry()[OP]["triton"], ops.o_lora)


@pytest.mark.parametrize("bug", ["wrong scale exponent", "dropped block scale", "off-by-one group"])
def test_planted_fp8_weight_bugs_are_caught(triton_o_lora, ref_model, monkeypatch, bug):
    # the kernel run on the FP8 weight a buggy cache or kernel would produce: one block's exponent one too high,
    # one block's scale dropped (read as 1.0), group g reading group g+1's rows
    g, rank, hd = LAYOUTS["tiny"]
    wo_a = weight(ref_model, "tiny")
    q, s = triton_o_lora.quantize_wo_a(wo_a)
    s = s.view(torch.uint8).clone()
    if bug == "wrong scale exponent":
        s[1, 0] += 1
    elif bug == "dropped block scale":
        s[0, 1] = 127
    else:
        # rolled as bytes: CUDA has no roll for float8 tensors
        q = q.view(torch.uint8).roll(-rank, dims=0).view(q.dtype)
        s = s.roll(-(rank // 128), dims=0)
    monkeypatch.setattr(triton_o_lora, "_fp8_weight", lambda w: (q, s, True))
    o = activations(63, hd)
    buggy = triton_o_lora.o_lora(o, wo_a, g, rank)
    with pytest.raises(AssertionError):
        check_gemm(_triton_impl(), buggy, reference(o, wo_a, g, rank), *golden_and_allowance(o, wo_a, g, rank))


def test_triton_writes_every_output(triton_o_lora, ref_model, monkeypatch):
    from parity.optimized.ops.triton import _gemm_common

    g, rank, hd = LAYOUTS["g4-r64"]
    wo_a = weight(ref_model, "g4-r64")
    o = activations(129, hd)
    clean = triton_o_lora.o_lora(o, wo_a, g, rank)
    monkeypatch.setattr(_gemm_common, "POISON", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an FP8-made weight: no fallback
        poisoned = triton_o_lora.o_lora(o, wo_a, g, rank)
    assert not poisoned.isnan().any() and torch.equal(poisoned, clean)


def _two_scale_weight(g, rank, kg):
    """A checkpoint-made wo_a whose 128-column blocks alternate in scale by 2^3 and whose 128-row blocks (where there
    are two or more) by 2^2: a 256-wide K step that applied one block's scale to both halves would be off by 8x on
    half its terms, a tile that read another row block's scale by 4x."""
    w = torch.randn(g * rank, kg) * kg**-0.5
    w.view(g * rank, kg // 256, 2, 128)[:, :, 1] *= 8
    w[128:256] *= 4
    return fp8_made(w).to(DEV)


WIDE_K = ["g2-k1024", "g2-r128-k1024"]  # per-row scales (rank 64) and one scale per tile (rank 128)


@pytest.mark.parametrize("layout", WIDE_K)
@pytest.mark.parametrize("m", [1, 7, 65])
def test_triton_256_wide_k_steps_apply_each_blocks_scale(triton_o_lora, m, layout):
    # the decode tiles step K by 256: two 128-column weight scale blocks per step, each with its own scale
    g, rank, hd = LAYOUTS[layout]
    wo_a = _two_scale_weight(g, rank, hd // g)
    q, s = triton_o_lora.quantize_wo_a(wo_a)
    assert (s.view(torch.uint8)[:, 1::2].int() - s.view(torch.uint8)[:, 0::2].int()).abs().min() > 0
    o = activations(m, hd)
    out = triton_o_lora.o_lora(o, wo_a, g, rank, _config=dict(BLOCK_W=64, BLOCK_T=16, BLOCK_K=256))
    check_gemm(_triton_impl(), out, reference(o, wo_a, g, rank), *golden_and_allowance(o, wo_a, g, rank))


def _planted_scales(s: torch.Tensor, bug: str) -> torch.Tensor:
    """The scales a buggy kernel would read: `column` each 256-wide step's second block with the first block's
    scale (one scale per step); `row` every 128-row block with the first one's (a tile's scale row taken without
    its group)."""
    s = s.view(torch.uint8).clone()
    if bug == "column":
        s[:, 1::2] = s[:, 0::2]
    else:
        s[1:] = s[0]
    return s


@pytest.mark.parametrize(
    ("layout", "bug"), [("g2-k1024", "column"), ("g2-r128-k1024", "column"), ("g2-r128-k1024", "row")]
)
def test_planted_bug_in_which_scale_a_block_takes_is_caught(triton_o_lora, monkeypatch, layout, bug):
    g, rank, hd = LAYOUTS[layout]
    wo_a = _two_scale_weight(g, rank, hd // g)
    q, s = triton_o_lora.quantize_wo_a(wo_a)
    s = _planted_scales(s, bug)
    monkeypatch.setattr(triton_o_lora, "_fp8_weight", lambda w: (q, s, True))
    o = activations(7, hd)
    buggy = triton_o_lora.o_lora(o, wo_a, g, rank, _config=dict(BLOCK_W=64, BLOCK_T=16, BLOCK_K=256))
    with pytest.raises(AssertionError):
        check_gemm(_triton_impl(), buggy, reference(o, wo_a, g, rank), *golden_and_allowance(o, wo_a, g, rank))


# ---- the compiled kernel's e4m3 -> bf16 dequantization (inline PTX), executed on the CPU ----------------------------

# scale bytes from the smallest e8m0 (2^-127: bf16 subnormal results) to the largest the kernel takes
PTX_SCALES = [0, 1, 9, 60, 100, 117, 127, 130, 134]


def ptx_dequant(text: str, words: np.ndarray, e: int) -> torch.Tensor:
    """The asm block on uint32 words of four e4m3 bytes with scale byte e -> bf16 [4 * len(words)]."""
    factor = np.uint32(((e + 120) << 7) * 0x10001)  # 2^(e - 7) in both bf16 lanes, as the kernel builds it
    lo, hi = run_ptx(text, {"$2": words, "$3": factor, "$4": factor}, ("$0", "$1"))
    pairs = np.stack([lo, hi], -1).astype(np.uint32)  # [n, 2] words of two bf16 each, bytes 0-1 then 2-3
    return torch.from_numpy(pairs.view(np.int16).copy()).view(torch.bfloat16).reshape(-1)


def dequant_mismatches(text: str) -> int:
    """Weights whose PTX value differs from the checkpoint dequantization (e4m3 * 2^(e - 127) rounded to bf16, as
    `dequantize_fp8_blocks` and convert.py make the model's wo_a), over every byte in every word position; the
    e4m3fn NaN codes (never in an FP8-made weight: `quantize_wo_a` refuses them) are left out."""
    words = all_byte_words()
    codes = torch.from_numpy(words.view(np.uint8).copy())
    finite = (codes & 0x7F) != 0x7F
    bad = 0
    for e in PTX_SCALES:
        want = (codes.view(torch.float8_e4m3fn).float() * 2.0 ** (e - 127)).to(torch.bfloat16)
        got = ptx_dequant(text, words, e)
        bad += int((got.view(torch.int16) != want.view(torch.int16))[finite].sum())
    return bad


def test_the_kernels_ptx_dequantization_is_the_checkpoints_bf16_weight(triton_o_lora):
    assert dequant_mismatches(triton_o_lora.E4M3_BF16_PTX.value) == 0


@pytest.mark.parametrize(
    "old, new",
    [
        ("0x9180", "0x1180"),  # the low pair without its sign replicated: negative weights come out positive
        ("shl.b32 t1, t1, 4", "shl.b32 t1, t1, 3"),  # the high pair's magnitude one bit off
        ("and.b32 t0, t0, 0x87F087F0", "and.b32 t0, t0, 0x8FF08FF0"),  # the sign bit leaks into the exponent
    ],
    ids=["sign", "shift", "mask"],
)
def test_planted_ptx_dequantization_bugs_are_caught(triton_o_lora, old, new):
    text = triton_o_lora.E4M3_BF16_PTX.value
    assert old in text
    assert dequant_mismatches(text.replace(old, new, 1)) > 0


def test_scales_beyond_the_bit_path_take_the_fp32_path(triton_o_lora):
    # a block scale byte above MAX_BITS_SCALE has no normal bf16 factor 2^(E - 7): such a weight is flagged for the
    # fp32 dequantization (same values), once, when its FP8 form is made
    g, rank, hd = LAYOUTS["g4-r64"]
    w = torch.randn(g * rank, hd // g) * (hd // g) ** -0.5
    assert triton_o_lora._recover_fp8(fp8_made(w))[2]
    w[:128, :128] *= 2.0**40  # one block's amax ~2^40: its scale byte is ~127 + 40 - 8
    q, s, bits = triton_o_lora._recover_fp8(fp8_made(w))
    assert int(s.max()) > triton_o_lora.MAX_BITS_SCALE and not bits


@pytest.mark.skipif(DEV != "cuda", reason="the bit dequantization is compiled PTX: the interpreter runs the fp32 path")
def test_compiled_bit_dequantization_equals_the_fp32_path_on_every_code(triton_o_lora, monkeypatch):
    # every finite e4m3 code under scale bytes from 0 (bf16 subnormal weights) to MAX_BITS_SCALE, through the whole
    # kernel: the same bits with the PTX dequantization as with the fp32 multiply
    g, rank, kg = 2, 128, 1024
    codes = torch.arange(256, dtype=torch.uint8).repeat(g * rank * kg // 256).view(g * rank, kg)
    codes[(codes & 0x7F) == 0x7F] = 0  # the NaN codes: never in an FP8-made weight
    q = codes.view(torch.float8_e4m3fn).to(DEV)
    s = torch.linspace(0, triton_o_lora.MAX_BITS_SCALE, g * rank // 128 * kg // 128).round().to(torch.uint8)
    s = s.view(g * rank // 128, kg // 128).to(DEV)
    wo_a = dequantize_fp8_blocks(q, s.view(torch.float8_e8m0fnu)).to(torch.bfloat16)
    o = activations(64, g * kg)
    outs = []
    for bits in (False, True):
        monkeypatch.setattr(triton_o_lora, "_fp8_weight", lambda w, bits=bits: (q, s, bits))
        outs.append(triton_o_lora.o_lora(o, wo_a, g, rank))
    assert torch.equal(outs[0], outs[1])


def test_decode_configs_are_the_swept_candidates(triton_o_lora, monkeypatch):
    # decode launches take a fixed pick (the autotuner's were 33-40 % slower at G 16 on the H100); every pick must
    # be one of the candidates bench/triton_gemm_sweep.py times, and the 64-token tile narrows its K step once there
    # are more tiles than SMs (two programs per SM instead of one)
    from parity.optimized.ops.triton import runtime

    monkeypatch.setattr(runtime, "interpreting", lambda: False)
    swept = [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in triton_o_lora._configs(True)]
    picks = {}
    for t, g in itertools.product((1, 7, 16, 17, 64), (8, 16)):
        picks[t, g] = triton_o_lora.decode_config(t, 1024, g, 132)
        assert picks[t, g] in swept, (t, g, picks[t, g])
    assert {p["BLOCK_T"] for (t, g), p in picks.items() if t <= 16} == {16}
    assert picks[64, 8]["BLOCK_K"] == 256 and picks[64, 16]["BLOCK_K"] == 128
    assert triton_o_lora.decode_config(64, 1024, 16, 264)["BLOCK_K"] == 256

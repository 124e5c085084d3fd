"""compress_pool: per channel, a softmax over a block's positions weights its kv rows, summed (fp32).

Twin: `parity.reference.model.Compressor.forward`: in prefill `(kv * score.softmax(dim=2)).sum(dim=2)` over
`[b, n, w, d]` blocks (w = 2r with the ratio-4 overlap, r otherwise), in decode `(kv_state * score_state.softmax(
dim=1)).sum(dim=1, keepdim=True)` over `[b, w, d]`. The optimized compressor calls the op with the same layouts
(b = 1, one request) and gets `[b, n, d]` / `[b, d]`. A non-bitwise backend is judged by `check` against the float64
pooling (the golden): never further from it than the twin's fp32 result plus 1 fp32 ulp.
"""

import pytest
import torch

from tests.optimized.ops.conftest import check

OP = "compress_pool"

# (batch, blocks, ratio, head dim); ratio 4 is the overlapped CSA compressor (w = 8), 128 the HCA one (w = 128)
PREFILL = [
    (1, 1, 4, 128),
    (1, 2, 4, 128),
    (1, 9, 4, 128),
    (2, 37, 4, 128),
    (1, 1, 128, 128),
    (3, 1, 128, 64),
    (1, 5, 128, 64),
]
DECODE = [(1, 4, 128), (2, 4, 128), (3, 128, 128), (1, 128, 64)]


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def run(impl, kv, score):
    dev = device_of(impl)
    return impl(kv.to(dev), score.to(dev)).cpu()


def golden(kv, score, dim):
    # the float64 math: exact softmax weights, exact sum
    return (kv.double() * torch.softmax(score.double(), dim=dim)).sum(dim=dim)


def compressor(ref_model, ratio):
    comp = ref_model.layers[1 if ratio == 4 else 2].attn.compressor
    assert comp.compress_ratio == ratio
    return comp


def prefill_blocks(comp, b, n, d):
    """kv/score blocks exactly as the reference prefill builds them (ape added, overlap_transform for ratio 4)."""
    ratio, coff = comp.compress_ratio, 1 + comp.overlap
    assert d == comp.head_dim or not comp.overlap  # overlap_transform splits at the module's head_dim
    kv = torch.randn(b, n, ratio, coff * d)
    score = torch.randn(b, n, ratio, coff * d) + comp.ape[:, : coff * d]
    if comp.overlap:
        kv, score = comp.overlap_transform(kv, 0), comp.overlap_transform(score, float("-inf"))
    return kv, score  # [b, n, w, d]


@pytest.mark.parametrize(("b", "n", "ratio", "d"), [pytest.param(*c, id="B{}-N{}-R{}-D{}".format(*c)) for c in PREFILL])
def test_prefill_layout_matches_reference(impl, ref_model, b, n, ratio, d):
    kv, score = prefill_blocks(compressor(ref_model, ratio), b, n, d)
    out = run(impl, kv, score)
    assert out.shape == (b, n, d) and out.dtype == torch.float32
    check(impl, out, (kv * score.softmax(dim=2)).sum(dim=2), golden=golden(kv, score, 2))


@pytest.mark.parametrize(("b", "ratio", "d"), [pytest.param(*c, id="B{}-R{}-D{}".format(*c)) for c in DECODE])
@pytest.mark.parametrize("first_block", [False, True], ids=["steady", "first"])
def test_decode_layout_matches_reference(impl, b, ratio, d, first_block):
    overlap = ratio == 4
    w = 2 * ratio if overlap else ratio
    kv_state = torch.randn(b, w, d)
    score_state = torch.randn(b, w, d)
    if overlap and first_block:
        score_state[:, :ratio] = float("-inf")  # no previous block yet: the reset state's -inf scores
    out = run(impl, kv_state, score_state)
    expected = (kv_state * score_state.softmax(dim=1)).sum(dim=1, keepdim=True)  # [b, 1, d]
    assert out.shape == (b, d)
    check(impl, out, expected[:, 0], golden=golden(kv_state, score_state, 1))


@pytest.mark.parametrize("w", [1, 3, 5, 16, 17, 127, 129])
def test_other_widths(impl, w):
    # the op form for any number of positions (the Triton op: one thread a pair up to 16, tiles padded to a power of
    # two with -inf scores and zero kv beyond)
    kv, score = torch.randn(3, w, 40), torch.randn(3, w, 40) * 4
    check(impl, run(impl, kv, score), (kv * score.softmax(dim=-2)).sum(dim=-2), golden=golden(kv, score, -2))


def test_strided_views_and_empty(impl):
    # the decode state rows are views into a per-slot buffer; a prefill with no complete block pools nothing
    state = torch.randn(3, 16, 256)
    kv, score = state[1, :, :128], state[2, :, 128:] * 3
    check(impl, run(impl, kv, score), (kv * score.softmax(dim=0)).sum(dim=0), golden=golden(kv, score, 0))
    assert run(impl, torch.randn(1, 0, 8, 64), torch.randn(1, 0, 8, 64)).shape == (1, 0, 64)


def test_all_masked_channel_is_nan_like_the_twin(impl):
    kv, score = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    score[1, :, 3] = float("-inf")
    out = run(impl, kv, score)
    expected = (kv * score.softmax(dim=-2)).sum(dim=-2)
    assert expected[1, 3].isnan() and out[1, 3].isnan()
    keep = ~expected.isnan()
    check(impl, out[keep], expected[keep], golden=golden(kv, score, -2)[keep])


def test_output_is_fully_written(impl, monkeypatch, ref_model):
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    kv, score = prefill_blocks(compressor(ref_model, 4), 1, 37, 128)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = run(impl, kv, score)
    monkeypatch.undo()
    check(impl, out, (kv * score.softmax(dim=2)).sum(dim=2), golden=golden(kv, score, 2))


def test_blocks_and_requests_are_independent(impl, ref_model):
    # the reference may pool several requests ([b, ...]) and blocks ([n, ...]) in one call, the optimized model
    # pools one request at a time and the decode path one block at a time
    kv, score = prefill_blocks(compressor(ref_model, 4), 3, 9, 128)
    full = run(impl, kv, score)
    for i in range(3):
        assert torch.equal(run(impl, kv[i : i + 1], score[i : i + 1]), full[i : i + 1])
        for j in (0, 4, 8):
            assert torch.equal(run(impl, kv[i, j], score[i, j]), full[i, j])


def test_planted_bug_transposed_layout_is_caught(impl, ref_model):
    # a kernel that reduces over a contiguous [..., d, w] copy (positions innermost) sums in another order: visible
    # to a bitwise backend only (a non-bitwise one may sum in any order)
    if not impl.bitwise:
        pytest.skip("another fp32 summation order is within a non-bitwise backend's tolerance")
    kv, score = prefill_blocks(compressor(ref_model, 4), 2, 37, 128)
    kt, st = kv.transpose(-1, -2).contiguous(), score.transpose(-1, -2).contiguous()
    buggy = (kt * st.softmax(dim=-1)).sum(dim=-1)
    with pytest.raises(AssertionError):
        check(impl, buggy, run(impl, kv, score))


@pytest.mark.parametrize("r", [8, 128], ids=["8-positions", "128-positions"])  # the Triton op's two kernels
@pytest.mark.parametrize("bug", ["window off by one token", "last position dropped"])
def test_planted_bug_is_caught(impl, bug, r):
    # blocks of r positions (no overlap) cut from one token sequence: 128 is the HCA compressor's
    n, d = 3, 64
    kv_tok, sc_tok = torch.randn(1, n * r + 1, d), torch.randn(1, n * r + 1, d) * 2
    kv, score = kv_tok[:, : n * r].unflatten(1, (n, r)), sc_tok[:, : n * r].unflatten(1, (n, r))
    want = (kv * score.softmax(dim=2)).sum(dim=2)
    if bug == "window off by one token":  # blocks [j r + 1, (j + 1) r + 1) instead of [j r, (j + 1) r)
        out = run(impl, kv_tok[:, 1:].unflatten(1, (n, r)), sc_tok[:, 1:].unflatten(1, (n, r)))
    else:  # a loop bound one short: the block's last position never weighs in
        out = run(impl, kv[:, :, :-1], score[:, :, :-1])
    with pytest.raises(AssertionError):
        check(impl, out, want, golden=golden(kv, score, 2))

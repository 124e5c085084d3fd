"""compress_pool: per channel, a softmax over a block's positions weights its kv rows, summed (fp32).

Twin: `parity.reference.model.Compressor.forward`: in prefill `(kv * score.softmax(dim=2)).sum(dim=2)` over
`[b, n, w, d]` blocks (w = 2r with the ratio-4 overlap, r otherwise), in decode `(kv_state * score_state.softmax(
dim=1)).sum(dim=1, keepdim=True)` over `[b, w, d]`. The optimized compressor calls the op with the same layouts
(b = 1, one request) and gets `[b, n, d]` / `[b, d]`.
"""

import pytest
import torch

from parity.optimized.ops import resolve_ops

OPS = resolve_ops()

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
def test_prefill_layout_matches_reference(ref_model, b, n, ratio, d):
    kv, score = prefill_blocks(compressor(ref_model, ratio), b, n, d)
    out = OPS.compress_pool(kv, score)
    assert out.shape == (b, n, d)
    assert torch.equal(out, (kv * score.softmax(dim=2)).sum(dim=2))


@pytest.mark.parametrize(("b", "ratio", "d"), [pytest.param(*c, id="B{}-R{}-D{}".format(*c)) for c in DECODE])
@pytest.mark.parametrize("first_block", [False, True], ids=["steady", "first"])
def test_decode_layout_matches_reference(b, ratio, d, first_block):
    overlap = ratio == 4
    w = 2 * ratio if overlap else ratio
    kv_state = torch.randn(b, w, d)
    score_state = torch.randn(b, w, d)
    if overlap and first_block:
        score_state[:, :ratio] = float("-inf")  # no previous block yet: the reset state's -inf scores
    out = OPS.compress_pool(kv_state, score_state)
    expected = (kv_state * score_state.softmax(dim=1)).sum(dim=1, keepdim=True)  # [b, 1, d]
    assert out.shape == (b, d)
    assert torch.equal(out, expected[:, 0])


def test_blocks_and_requests_are_independent(ref_model):
    # the reference may pool several requests ([b, ...]) and blocks ([n, ...]) in one call, the optimized model
    # pools one request at a time and the decode path one block at a time
    kv, score = prefill_blocks(compressor(ref_model, 4), 3, 9, 128)
    full = OPS.compress_pool(kv, score)
    for i in range(3):
        assert torch.equal(OPS.compress_pool(kv[i : i + 1], score[i : i + 1]), full[i : i + 1])
        for j in range(9):
            assert torch.equal(OPS.compress_pool(kv[i, j], score[i, j]), full[i, j])


def test_planted_bug_transposed_layout_is_caught(ref_model):
    # a kernel that reduces over a contiguous [..., d, w] copy (positions innermost) sums in another order
    kv, score = prefill_blocks(compressor(ref_model, 4), 2, 37, 128)
    kt, st = kv.transpose(-1, -2).contiguous(), score.transpose(-1, -2).contiguous()
    buggy = (kt * st.softmax(dim=-1)).sum(dim=-1)
    assert not torch.equal(buggy, OPS.compress_pool(kv, score))

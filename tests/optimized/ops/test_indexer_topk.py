"""indexer_topk: relu(q . k) weighted per head, summed over heads, top-k of the entries each query may see.

Twin: the scoring, mask and top-k of `parity.reference.model.Indexer.forward` for one request (b = 1, offset 0):
- start_pos 0 (prefill of L tokens): `[1, L, h, d] x [1, t, d]` scores, the causal entry mask (-inf), top-k of
  `min(index_topk, t)` over the full row, entries a query cannot see yet -> -1;
- start_pos > 0: the reference only decodes one token at a time, so token r (position p = start_pos + r) is
  compared with a decode step: `[1, 1, h, d] x [1, (p + 1) // ratio, d]`, top-k of its visible entries, padded
  with -1 to the op's width.
Inputs are realistic: Hadamard-rotated, FP4 fake-quantized queries and entries (coarse values, so relu zeros and
ties are common) and bf16 head weights scaled like `weights_proj(x) * (d ** -0.5 * h ** -0.5)`.

A bitwise backend must return the twin's ids exactly. Others are judged modulo ties (`judge`): per row, the same
number of ids, the twin's scores of the returned ids equal to the twin's scores of its own ids in the same
descending order (so the id SETS agree except which of several equal-scored entries fill the last places, and the
order within runs of equal scores), -1 after them; and the kernel's own tie rule, stated: among equal scores,
ascending entry id (torch.topk's order there is implementation-defined).
"""

import pytest
import torch

from parity.reference import kernels
from parity.reference import model as ref
from tests.optimized.ops.conftest import check

OP = "indexer_topk"
RATIO = 4

# (start_pos, tokens, index heads, index_topk)
CASES = [
    (0, 1, 4, 16),
    (0, 2, 4, 16),
    (0, 5, 3, 16),
    (0, 37, 4, 16),
    (0, 63, 4, 8),
    (0, 129, 4, 16),
    (0, 150, 1, 16),
    (3, 1, 4, 16),
    (5, 1, 4, 16),
    (129, 1, 4, 16),
    (100, 2, 3, 16),
    (37, 5, 4, 16),
    (7, 63, 4, 8),
    (63, 37, 4, 16),
    (20, 129, 4, 16),
]
PARAMS = [pytest.param(*c, id="P{}-T{}-H{}-K{}".format(*c)) for c in CASES]
D = 128  # index_head_dim


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def run(impl, q, entries, weights, k, start_pos, ratio=RATIO, **kwargs):
    dev = device_of(impl)
    return impl(q.to(dev), entries.to(dev), weights.to(dev), k, start_pos, ratio, **kwargs).cpu()


def fp4_rotated(*shape):
    x = ref.rotate_activation(torch.randn(*shape).to(torch.bfloat16))
    return kernels.fp4_act_quant(x, ref.FP4_BLOCK_SIZE, True)


def operands(start_pos, n, h):
    t = (start_pos + n) // RATIO  # entries completed by the end of the step
    weights = torch.randn(n, h).to(torch.bfloat16) * (D**-0.5 * h**-0.5)
    return fp4_rotated(n, h, D), fp4_rotated(t, D), weights


def reference_scores(q, entries, weights):
    # ref.Indexer.forward: q [b, s, h, d], kv_cache[:b, :end_pos // ratio] [b, t, d], weights [b, s, h]
    score = torch.einsum("bshd,btd->bsht", q, entries)
    return (score.relu_() * weights.unsqueeze(-1)).sum(dim=2)  # [b, s, t]


def reference_prefill(q, entries, weights, index_topk):
    seqlen = q.shape[0]
    score = reference_scores(q[None], entries[None], weights[None])
    mask = ref.causal_entry_mask(seqlen, RATIO)
    score += torch.where(mask, float("-inf"), 0.0).to(score.dtype)
    topk = score.topk(min(index_topk, seqlen // RATIO), dim=-1)[1]
    late = topk >= torch.arange(1, seqlen + 1).unsqueeze(1) // RATIO
    return torch.where(late, -1, topk)[0]


def reference_decodes(q, entries, weights, index_topk, start_pos, width):
    out = torch.full((q.shape[0], width), -1, dtype=torch.int64)
    for r in range(q.shape[0]):
        end_pos = start_pos + r + 1
        visible = end_pos // RATIO
        score = reference_scores(q[None, r : r + 1], entries[None, :visible], weights[None, r : r + 1])
        topk = score.topk(min(index_topk, visible), dim=-1)[1][0, 0]
        out[r, : topk.numel()] = topk
    return out


def twin_score_rows(q, entries, weights, start_pos):
    """The twin's scores as it computes them: one prefill matrix, or one decode row per token (-inf past view)."""
    if start_pos == 0:
        return reference_scores(q[None], entries[None], weights[None])[0].float()
    rows = torch.full((q.shape[0], entries.shape[0]), float("-inf"))
    for r in range(q.shape[0]):
        vis = (start_pos + r + 1) // RATIO
        rows[r, :vis] = reference_scores(q[None, r : r + 1], entries[None, :vis], weights[None, r : r + 1])[0, 0]
    return rows


def tie_rule(scores, start_pos, k):
    """The triton kernel's ids: the visible entries stably sorted by descending score (ties: ascending id)."""
    out = torch.full((scores.shape[0], k), -1, dtype=torch.int64)
    for r in range(scores.shape[0]):
        vis = min((start_pos + r + 1) // RATIO, scores.shape[1])
        order = torch.sort(-scores[r, :vis], stable=True)[1][:k]
        out[r, : order.numel()] = order
    return out


def judge(impl, got, want, scores, start_pos):
    if impl.bitwise:
        check(impl, got, want)
        return
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    k = got.shape[1]
    for r in range(got.shape[0]):
        kr = min(k, (start_pos + r + 1) // RATIO, scores.shape[1])
        g, w = got[r, :kr], want[r, :kr]
        assert (got[r, kr:] == -1).all() and (want[r, kr:] == -1).all(), f"row {r}: ids past the visible entries"
        assert ((g >= 0) & (g < (start_pos + r + 1) // RATIO)).all() and g.unique().numel() == kr, f"row {r}: {g}"
        # the same scores in the same order: equal sets up to the choice and order among equal scores
        assert torch.equal(scores[r, g], scores[r, w]), f"row {r}: scores {scores[r, g]} vs {scores[r, w]}"
    assert torch.equal(got, tie_rule(scores, start_pos, k)), "ties not in ascending entry id"


@pytest.mark.parametrize(("start_pos", "n", "h", "index_topk"), PARAMS)
def test_matches_reference_indexer(impl, start_pos, n, h, index_topk):
    q, entries, weights = operands(start_pos, n, h)
    k = min(index_topk, entries.shape[0])  # what OptIndexer passes
    out = run(impl, q, entries, weights, k, start_pos)
    if start_pos == 0:
        expected = reference_prefill(q, entries, weights, index_topk)
    else:
        expected = reference_decodes(q, entries, weights, index_topk, start_pos, k)
    assert out.dtype == torch.int64 and out.shape == (n, k)
    judge(impl, out, expected, twin_score_rows(q, entries, weights, start_pos), start_pos)


@pytest.mark.parametrize("n", [3, 4, 5, 127, 128, 129])
def test_prefill_at_compress_boundaries(impl, n):
    # n < 4: no entry yet (k = 0, an empty top-k); early rows see nothing (all -1); 128 / 129 cross index_topk
    q, entries, weights = operands(0, n, 4)
    k = min(16, entries.shape[0])
    out = run(impl, q, entries, weights, k, 0)
    assert out.shape == (n, k)
    expected = reference_prefill(q, entries, weights, 16)
    judge(impl, out, expected, twin_score_rows(q, entries, weights, 0), 0)


def test_all_scores_tied(impl):
    # zero head weights: every score is 0, every entry ties; the twin's order is torch's, the kernel's ascending id
    q, entries, weights = operands(40, 9, 4)
    weights = torch.zeros_like(weights)
    out = run(impl, q, entries, weights, 8, 40)
    expected = reference_decodes(q, entries, weights, 8, 40, 8)
    judge(impl, out, expected, twin_score_rows(q, entries, weights, 40), 40)


@pytest.mark.parametrize("method", ["merge", "radix"])
@pytest.mark.parametrize(
    ("start_pos", "queries", "topk"),
    [
        # the triton backend's long-row kernels on a short row, tiny chunks
        pytest.param(63, 5, 16, id="one-chunk"),
        # rows of ~100 visible entries in chunks of 16 keys, top 8: the merge's four tree levels (7 chunks -> 56
        # candidates -> 4 chunks -> 2 -> 1), each keeping its chunks' top 8; the radix select's 7 chunks a pass
        pytest.param(400, 3, 8, id="many-chunks"),
    ],
)
def test_long_rows_through_the_chunked_kernels(impl, method, start_pos, queries, topk):
    # the same ids as ranking the whole row at once, and judged against the twin
    if impl.backend != "triton":
        pytest.skip("only the triton backend has several top-k kernels")
    q, entries, weights = operands(start_pos, queries, 4)
    rank = run(impl, q, entries, weights, topk, start_pos, method="rank")
    chunked = run(impl, q, entries, weights, topk, start_pos, method=method, chunk=16)
    assert torch.equal(rank, chunked)
    expected = reference_decodes(q, entries, weights, topk, start_pos, topk)
    judge(impl, chunked, expected, twin_score_rows(q, entries, weights, start_pos), start_pos)


def crafted_scores(n, t, seed):
    # rows the model's relu scores rarely give, each hard for a radix select: -0 next to +0, ties across the k-th
    # place, +-inf, negatives, and runs of values that share their top 24 bits (the last digit decides)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, t, generator=g)
    s[:, ::3] = 0.0
    s[:, 1::7] = -0.0
    s[:, 2::5] = s[:, 2:3]
    near = torch.tensor(1.0).view(torch.int32) + torch.randint(0, 200, (n, t), generator=g, dtype=torch.int32)
    s[:, 4::2] = near.view(torch.float32)[:, 4::2]
    s[:, 5], s[:, 6] = float("inf"), float("-inf")
    return s


@pytest.mark.parametrize("method", ["rank", "merge", "radix"])
@pytest.mark.parametrize(
    ("start_pos", "n", "t", "k", "chunk"),
    [(400, 3, 100, 8, 16), (0, 9, 40, 8, 16), (1200, 4, 300, 32, 64), (60, 3, 16, 64, None)],
)
def test_selection_of_crafted_scores(impl, method, start_pos, n, t, k, chunk):
    # the top-k kernels on score rows given directly: the visible entries stably sorted by descending score
    # (ascending id among equal scores, +0 == -0), -1 past them; rows that see fewer than k entries and none
    if impl.backend != "triton":
        pytest.skip("the triton backend's top-k kernels")
    from parity.optimized.ops.triton import indexer_topk as tri

    scores = crafted_scores(n, t, start_pos + t)
    out = torch.empty(n, k, dtype=torch.int64, device=device_of(impl))
    got = tri._topk(scores.to(out.device), out, start_pos, RATIO, None, method, chunk).cpu()
    assert torch.equal(got, tie_rule(scores.where(scores != 0, 0.0), start_pos, k))


@pytest.mark.parametrize(
    ("n", "t", "method"),
    [(1, 16384, "radix"), (1, 32768, "radix"), (1, 65536, "merge"), (4, 65536, "merge"), (16, 65536, "merge"),
     (64, 16384, "radix"), (1, 131072, "merge"), (64, 65536, "radix"), (4096, 4096, "radix")],
)  # fmt: skip
def test_long_rows_take_the_measured_faster_method(n, t, method):
    # the rule `_topk` applies, on the shapes whose merge and radix times placed it (MERGE_MIN_CHUNKS,
    # MERGE_MAX_CHUNKS: H100, docs/perf.md); 64 rows of 64k, unmeasured, stay with the radix select's flat time
    pytest.importorskip("triton")
    from parity.optimized.ops.triton import indexer_topk as tri
    from parity.optimized.ops.triton import runtime

    assert tri._method(n, t, max(16, runtime.next_pow2(t))) == method


def test_planted_bug_radix_digit_pass_dropped_is_caught(impl):
    # the radix select without its last digit's pass: entries that share the top 24 bits of the k-th score tie
    if impl.backend != "triton":
        pytest.skip("the triton backend's radix select")
    from parity.optimized.ops.triton import indexer_topk as tri

    scores = crafted_scores(3, 100, 7)
    out = torch.empty(3, 8, dtype=torch.int64, device=device_of(impl))
    got = tri._topk(scores.to(out.device), out, 400, RATIO, None, "radix", 16, plant=1).cpu()
    assert not torch.equal(got, tie_rule(scores.where(scores != 0, 0.0), 400, 8))


def test_output_is_fully_written(impl, monkeypatch):
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(12345)

    q, entries, weights = operands(0, 37, 4)
    monkeypatch.setattr(torch, "empty", poisoned)
    out = run(impl, q, entries, weights, 9, 0)
    monkeypatch.undo()
    assert ((out >= -1) & (out < entries.shape[0])).all()
    judge(impl, out, reference_prefill(q, entries, weights, 16), twin_score_rows(q, entries, weights, 0), 0)


def test_a_request_does_not_depend_on_the_step_it_is_split_into(impl):
    # after a context, tokens scored in one chunk equal the same tokens scored in smaller chunks (decode-exact)
    q, entries, weights = operands(40, 37, 4)
    whole = run(impl, q, entries, weights, 16, 40)
    for a, b in ((0, 1), (1, 5), (5, 36), (36, 37)):
        n_entries = (40 + b) // RATIO
        part = run(impl, q[a:b], entries[:n_entries], weights[a:b], min(16, n_entries), 40 + a)
        assert torch.equal(part, whole[a:b, : part.shape[1]])
        assert (whole[a:b, part.shape[1] :] == -1).all()


@pytest.mark.parametrize(("start_pos", "n"), [(63, 37), (20, 129)])
def test_planted_bug_masked_wide_row_is_caught(impl, start_pos, n):
    # scoring a chunk after a context like a prefill (one -inf-masked row over all entries) ranks the tied relu
    # zeros in another order than the decode steps do: the torch backend's reason for its per-token top-k (a
    # backend with its own tie rule is judged modulo ties, where this is not a bug)
    if not impl.bitwise:
        pytest.skip("tie order: judged modulo ties for this backend")
    q, entries, weights = operands(start_pos, n, 4)
    score = reference_scores(q[None], entries[None], weights[None])[0]
    assert (score == 0).any()  # ties are present
    visible = (torch.arange(start_pos, start_pos + n) + 1) // RATIO
    mask = torch.arange(entries.shape[0]) >= visible[:, None]
    wide = (score + torch.where(mask, float("-inf"), 0.0)).topk(16, dim=-1)[1]
    wide = torch.where(wide >= visible[:, None], -1, wide)
    expected = reference_decodes(q, entries, weights, 16, start_pos, 16)
    check(impl, run(impl, q, entries, weights, 16, start_pos), expected)
    with pytest.raises(AssertionError):
        check(impl, wide, expected)


@pytest.mark.parametrize("bug", ["causal limit off by one", "head weights dropped", "relu dropped"])
def test_planted_bug_is_caught(impl, bug):
    start_pos, n = 20, 40
    q, entries, weights = operands(start_pos, n, 4)
    expected = reference_decodes(q, entries, weights, 16, start_pos, 16)
    scores = twin_score_rows(q, entries, weights, start_pos)
    if bug == "causal limit off by one":  # each query sees one position further: (p + 2) // 4 entries
        got = run(impl, q, entries, weights, 16, start_pos + 1)
    elif bug == "head weights dropped":
        got = run(impl, q, entries, torch.full_like(weights, D**-0.5 * 4**-0.5), 16, start_pos)
    else:  # a negative head product kept: relu(x) w != x w; flip q's sign so relu zeros the other half
        got = run(impl, -q, entries, -weights, 16, start_pos)
    with pytest.raises(AssertionError):
        judge(impl, got, expected, scores, start_pos)

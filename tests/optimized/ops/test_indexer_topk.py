"""indexer_topk: relu(q . k) weighted per head, summed over heads, top-k of the entries each query may see.

Twin: the scoring, mask and top-k of `parity.reference.model.Indexer.forward` for one request (b = 1, offset 0):
- start_pos 0 (prefill of L tokens): `[1, L, h, d] x [1, t, d]` scores, the causal entry mask (-inf), top-k of
  `min(index_topk, t)` over the full row, entries a query cannot see yet -> -1;
- start_pos > 0: the reference only decodes one token at a time, so token r (position p = start_pos + r) is
  compared with a decode step: `[1, 1, h, d] x [1, (p + 1) // ratio, d]`, top-k of its visible entries, padded
  with -1 to the op's width.
Inputs are realistic: Hadamard-rotated, FP4 fake-quantized queries and entries (coarse values, so relu zeros and
ties are common) and bf16 head weights scaled like `weights_proj(x) * (d ** -0.5 * h ** -0.5)`.
"""

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.reference import kernels
from parity.reference import model as ref

OPS = resolve_ops()
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


@pytest.mark.parametrize(("start_pos", "n", "h", "index_topk"), PARAMS)
def test_matches_reference_indexer(start_pos, n, h, index_topk):
    q, entries, weights = operands(start_pos, n, h)
    k = min(index_topk, entries.shape[0])  # what OptIndexer passes
    out = OPS.indexer_topk(q, entries, weights, k, start_pos, RATIO)
    if start_pos == 0:
        expected = reference_prefill(q, entries, weights, index_topk)
    else:
        expected = reference_decodes(q, entries, weights, index_topk, start_pos, k)
    assert out.dtype == torch.int64 and out.shape == (n, k)
    assert torch.equal(out, expected)


def test_a_request_does_not_depend_on_the_step_it_is_split_into():
    # after a context, tokens scored in one chunk equal the same tokens scored in smaller chunks (decode-exact)
    q, entries, weights = operands(40, 37, 4)
    whole = OPS.indexer_topk(q, entries, weights, 16, 40, RATIO)
    for a, b in ((0, 1), (1, 5), (5, 36), (36, 37)):
        n_entries = (40 + b) // RATIO
        part = OPS.indexer_topk(q[a:b], entries[:n_entries], weights[a:b], min(16, n_entries), 40 + a, RATIO)
        assert torch.equal(part, whole[a:b, : part.shape[1]])
        assert (whole[a:b, part.shape[1] :] == -1).all()


@pytest.mark.parametrize(("start_pos", "n"), [(63, 37), (20, 129)])
def test_planted_bug_masked_wide_row_is_caught(start_pos, n):
    # scoring a chunk after a context like a prefill (one -inf-masked row over all entries) ranks the tied relu
    # zeros in another order than the decode steps do: the op's reason for its per-token top-k
    q, entries, weights = operands(start_pos, n, 4)
    score = reference_scores(q[None], entries[None], weights[None])[0]
    assert (score == 0).any()  # ties are present
    visible = (torch.arange(start_pos, start_pos + n) + 1) // RATIO
    mask = torch.arange(entries.shape[0]) >= visible[:, None]
    wide = (score + torch.where(mask, float("-inf"), 0.0)).topk(16, dim=-1)[1]
    wide = torch.where(wide >= visible[:, None], -1, wide)
    expected = reference_decodes(q, entries, weights, 16, start_pos, 16)
    assert torch.equal(OPS.indexer_topk(q, entries, weights, 16, start_pos, RATIO), expected)
    assert not torch.equal(wide, expected)

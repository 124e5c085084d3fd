"""Indexer scoring and top-k for one request: relu(q . k) weighted per head, summed over heads, top-k of the
entries each query may see.

Reference: parity.reference.model.Indexer.forward (the einsum, relu, weighting, head sum, mask and top-k), with
shapes `[1, s, h, d] x [1, t, d]` exactly as for a request alone.
"""

import torch

from parity.optimized.ops.registry import Impl
from parity.reference.model import causal_entry_mask


def _scores(q, entries, weights):
    # q: [L, h, d], entries: [t, d], weights: [L, h] -> [1, L, t], the reference's ops and shapes
    score = torch.einsum("bshd,btd->bsht", q[None], entries[None])
    return (score.relu_() * weights[None].unsqueeze(-1)).sum(dim=2)


def indexer_topk_torch(q, entries, weights, k, start_pos, ratio):
    # q: [L, h, d] bf16, entries: [t, d] bf16 (entries 0..t-1), weights: [L, h] -> [L, k] int64, -1 = none
    seqlen = q.shape[0]
    if start_pos == 0:
        # the reference prefill: mask entries a query cannot see yet, top-k over the full row
        score = _scores(q, entries, weights)
        mask = causal_entry_mask(seqlen, ratio, q.device)
        score += torch.where(mask, float("-inf"), 0.0).to(score.dtype)
        topk = score.topk(k, dim=-1)[1][0]
        limit = torch.arange(1, seqlen + 1, device=q.device).unsqueeze(1) // ratio
        return torch.where(topk >= limit, -1, topk)
    # after a context, each token as the reference decode scores it: over exactly its visible entries, alone (a
    # wider masked row breaks ties among equal scores, e.g. relu zeros, in another order, and cuBLAS picks its
    # kernel by shape)
    out = torch.full((seqlen, k), -1, dtype=torch.int64, device=q.device)
    for r in range(seqlen):
        visible = (start_pos + r + 1) // ratio
        kr = min(k, visible)
        score = _scores(q[r : r + 1], entries[:visible], weights[r : r + 1])
        out[r, :kr] = score[0, 0].topk(kr, dim=-1)[1]
    return out


IMPLS = {
    "torch": Impl(indexer_topk_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.indexer_topk:indexer_topk",
        bitwise=False,
        tolerance="the twin's ids up to ties: scores are the twin's bits for FP4-grid operands (exact fp32 dot "
        "products, one bf16 rounding each step); equal scores are ordered by ascending entry id, where torch.topk's "
        "order is implementation-defined; the tests compare the id sets modulo ties and the exact tie rule",
    ),
}

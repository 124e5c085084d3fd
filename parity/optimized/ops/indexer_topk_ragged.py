"""`indexer_topk` for a whole batch in one call: every query's indexer scores against its own sequence's
compressed entries, read from the flat paged pool through row ids (no per-request gathered copy), weighted per
head, summed over heads, and the top-k of the entries it may see, k per sequence.

Reference: parity.reference.model.Indexer.forward, per request, exactly as `indexer_topk` (each sequence's rows are
what `indexer_topk` gives for that sequence alone, -1 past its own k up to the batch's widest).

Its backend follows `indexer_topk`'s unless named itself (`registry.FOLLOWS`): `PARITY_OPS=indexer_topk=triton`
moves both entry points.
"""

import torch
import torch.nn.functional as F

from parity.optimized.ops.indexer_topk import indexer_topk_torch
from parity.optimized.ops.registry import Impl


def indexer_topk_ragged_torch(q, pool, entry_rows, weights, cu_seqlens, cu_entries, k, start_pos, ratio):
    # q: [T, h, d], pool: [P, d], entry_rows: [sum n_i] pool rows of the sequences' entries (sequence i's at
    # cu_entries[i]:cu_entries[i+1]), weights: [T, h] -> [T, max k] int64. The reference semantics: the per-request
    # op on each sequence's entries (one gather for all of them, as the model's per-request path did)
    entries = pool[entry_rows]
    out = []
    for i in range(len(k)):
        rows = slice(cu_seqlens[i], cu_seqlens[i + 1])
        own = entries[cu_entries[i] : cu_entries[i + 1]]
        out.append(indexer_topk_torch(q[rows], own, weights[rows], k[i], start_pos[i], ratio))
    width = max(k, default=0)
    if not out:
        return torch.empty(0, width, dtype=torch.int64, device=q.device)
    return pad_cat(out, width)


def pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Per-sequence [n_i, k_i] id lists stacked into [T, width], -1 past each list (the batch's id layout)."""
    return torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in parts])


IMPLS = {
    "torch": Impl(indexer_topk_ragged_torch),
    "triton": Impl(
        "parity.optimized.ops.triton.indexer_topk:indexer_topk_ragged",
        bitwise=False,
        tolerance="the triton indexer_topk's ids, row for row (one scores launch reading the pool by row ids, one "
        "top-k pass with per-row entry count, k and position): the twin's ids up to ties, equal scores in ascending "
        "entry id",
    ),
}

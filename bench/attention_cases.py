"""sparse_attn inputs at V4 shapes, laid out as OptAttention builds its index lists, for the benches that time the
op (`bench/triton_attention.py`, `bench/ncu_ops.py` and through it `bench/sparse_attn_stages.py`)."""

import torch

BF16 = torch.bfloat16
WINDOW = 128  # V4's sliding window (config `window_size`)


def decode_lists(t, ctx, ratio, topk, d, pool_rows, gen, device):
    """T decode tokens, one request each, at position ctx - 1: sources (own kv, the rings, the entry pool) and
    [T, K] lists: 127 ring rows + the token's own row, then the request's visible entries (all of them for HCA,
    `topk` random ones for CSA), each request's entries distinct rows of the shared pool."""
    n_ent = min(topk, ctx // ratio) if ratio == 4 else ctx // ratio
    chunk = torch.randn(t, d, dtype=BF16, device=device)
    ring = torch.randn(t * WINDOW, d, dtype=BF16, device=device)
    ring_idx = t + torch.arange(t, device=device)[:, None] * WINDOW + torch.arange(WINDOW - 1, device=device)
    own = torch.arange(t, device=device)[:, None]
    ent = torch.randint(0, pool_rows.shape[0], (t, n_ent), generator=gen).to(device)  # repeats: rare and harmless
    idx = torch.cat([ring_idx, own, t + t * WINDOW + ent], dim=1)
    return (chunk, ring, pool_rows), idx


def prefill_lists(s, ratio, topk, d, gen, device):
    """One s-token prefill: window rows of the chunk, then the visible entries ((i+1)//ratio, top-k of them for
    CSA: a random subset, -1 padded)."""
    chunk = torch.randn(s, d, dtype=BF16, device=device)
    entries = torch.randn(s // ratio, d, dtype=BF16, device=device)
    i = torch.arange(s, device=device)[:, None]
    win = (i - WINDOW + 1).clamp(min=0) + torch.arange(min(s, WINDOW), device=device)
    win = torch.where(win > i, -1, win)
    vis = (i + 1) // ratio
    width = min(topk, s // ratio) if ratio == 4 else s // ratio
    if ratio == 4:
        r = torch.rand(s, s // ratio, generator=gen).to(device)
        r = torch.where(torch.arange(s // ratio, device=device) < vis, r, -1.0)
        ent = r.topk(width, dim=1).indices
        ent = torch.where(ent < vis, ent, -1)
    else:
        ent = torch.arange(width, device=device).expand(s, width)
        ent = torch.where(ent < vis, ent, -1)
    idx = torch.cat([win, torch.where(ent < 0, -1, s + ent)], dim=1)
    return (chunk, entries), idx

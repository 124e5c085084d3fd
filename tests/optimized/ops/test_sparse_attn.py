"""sparse_attn: sparse MQA with a per-head sink over KV rows gathered from several sources by virtual row id.

Twin: `parity.reference.kernels.sparse_attn(q [1, s, h, d], kv [1, n, d], sink, idx [1, s, k], scale)`, called by
`ref.Attention.forward` with one request's own KV layout. The op gets the flat queries `[T, h, d]`, a tuple of
sources (chunk KV, window ring, entry pool) and `idx [T, K]` into their virtual concatenation (-1 = none, rows
padded with trailing -1 to the batch's widest list). Each query must see the same rows in the same order, so the
same 64-slot blocks, as in its request's reference call.
"""

import pytest
import torch
import torch.nn.functional as F

from parity.optimized.ops import resolve_ops
from parity.optimized.ops.sparse_attn import gather_rows
from parity.reference import kernels
from parity.reference import model as ref

OPS = resolve_ops()

# per request (queries s, own KV rows n, list width k); lists cross the 64-slot blocks at 70 and 130
CASES = [
    (((1, 3, 3),), 4, 128),
    (((2, 10, 9),), 4, 64),
    (((5, 20, 70),), 3, 128),
    (((37, 150, 130),), 4, 128),
    (((63, 64, 64),), 1, 64),
    (((1, 3, 3), (5, 20, 70), (2, 10, 9)), 4, 128),
    (((37, 150, 130), (1, 200, 129), (3, 5, 5)), 3, 64),
    (((2, 8, 8), (1, 1, 1), (5, 66, 66), (1, 40, 17), (3, 9, 2)), 4, 128),
]


def _id(case):
    reqs, h, d = case
    return "R{}-H{}-D{}".format("_".join("{}x{}x{}".format(*r) for r in reqs), h, d)


PARAMS = [pytest.param(*c, id=_id(c)) for c in CASES]


def request(s, n, k, h, d):
    """One request's queries, own KV rows and slot lists (with -1 holes, every query sees at least one row)."""
    q = torch.randn(s, h, d).to(torch.bfloat16)
    kv = torch.randn(n, d).to(torch.bfloat16)
    idx = torch.randint(0, n, (s, k))
    idx[torch.rand(s, k) < 0.25] = -1
    idx[:, 0] = torch.randint(0, n, (s,))
    return q, kv, idx


def place(reqs, d, spare=50):
    """Scatter every request's KV rows over a shared pool split into three sources; map the lists to pool rows."""
    total = sum(kv.shape[0] for _, kv, _ in reqs) + spare
    rows_of = torch.randperm(total)
    pool = torch.randn(total, d).to(torch.bfloat16)  # rows no request uses hold noise
    lists, at = [], 0
    for _, kv, idx in reqs:
        rows = rows_of[at : at + kv.shape[0]]
        at += kv.shape[0]
        pool[rows] = kv
        lists.append(torch.where(idx < 0, -1, rows[idx.clamp(min=0)]))
    width = max(x.shape[1] for x in lists)
    idx = torch.cat([F.pad(x, (0, width - x.shape[1]), value=-1) for x in lists])
    cut1, cut2 = total // 5, total // 2
    return (pool[:cut1], pool[cut1:cut2], pool[cut2:]), idx


def reference(q, kv, idx, sink, scale):
    return kernels.sparse_attn(q[None], kv[None], sink, idx[None].int(), scale)[0]


@pytest.mark.parametrize(("specs", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_request(specs, h, d):
    reqs = [request(*spec, h, d) for spec in specs]
    sink, scale = torch.randn(h), d**-0.5
    sources, idx = place(reqs, d)
    out = OPS.sparse_attn(torch.cat([r[0] for r in reqs]), sources, idx, sink, scale)
    expected = torch.cat([reference(q, kv, i, sink, scale) for q, kv, i in reqs])
    assert out.dtype == torch.bfloat16 and out.shape == (idx.shape[0], h, d)
    assert torch.equal(out, expected)


def test_reference_prefill_layout(ref_model):
    # a CSA prefill exactly as ref.Attention lays it out: kv = [window kv of the s tokens, s // 4 entries], window
    # lists then entry lists (offset s); the op sees the same rows split as chunk KV + entry pool
    attn = ref_model.layers[1].attn
    s, win, ratio, h, d = 37, attn.window_size, attn.compress_ratio, attn.n_heads, attn.head_dim
    q = torch.randn(s, h, d).to(torch.bfloat16)
    kv = torch.randn(s, d).to(torch.bfloat16)
    entries = torch.randn(s // ratio, d).to(torch.bfloat16)
    idx = torch.cat(
        [
            ref.get_window_topk_idxs(win, 1, s, 0),
            ref.get_compress_topk_idxs(ratio, 1, s, 0, s),
        ],
        dim=-1,
    )[0]
    expected = reference(q, torch.cat([kv, entries]), idx, attn.attn_sink, attn.softmax_scale)
    ring = torch.randn(2 * win, d).to(torch.bfloat16)  # an unused window ring between chunk and pool
    virtual = torch.where(idx >= s, idx + ring.shape[0], idx)
    out = OPS.sparse_attn(q, (kv, ring, entries), virtual, attn.attn_sink, attn.softmax_scale)
    assert torch.equal(out, expected)


def test_requests_do_not_depend_on_batchmates_placement_or_padding():
    h, d = 4, 128
    sink = torch.randn(h)
    a = request(37, 150, 70, h, d)
    alone_sources, alone_idx = place([a], d, spare=0)
    alone = OPS.sparse_attn(a[0], alone_sources, alone_idx, sink, d**-0.5)
    for before, after in (((5, 20, 130),), ()), ((), ((1, 3, 3), (2, 10, 200))), (((1, 1, 1),), ((3, 9, 9),)):
        reqs = [request(*x, h, d) for x in before] + [a] + [request(*x, h, d) for x in after]
        sources, idx = place(reqs, d)
        out = OPS.sparse_attn(torch.cat([r[0] for r in reqs]), sources, idx, sink, d**-0.5)
        first = sum(x[0] for x in before)
        assert torch.equal(out[first : first + 37], alone)


def test_gather_reads_zeros_for_missing_rows():
    src = (torch.ones(2, 4), 2 * torch.ones(3, 4))
    got = gather_rows(src, torch.tensor([[4, -1, 0, 2]]))
    assert torch.equal(got[0, :, 0], torch.tensor([2.0, 0.0, 1.0, 2.0]))


def test_planted_bug_compacted_lists_are_caught():
    # a kernel that packs the valid slots to the front (dropping the -1 holes) changes which rows share a 64-slot
    # block, hence the running-max rounding: not bitwise
    h, d = 4, 128
    q, kv, idx = request(37, 150, 130, h, d)
    sink = torch.randn(h)
    compact = torch.gather(idx, 1, torch.sort((idx < 0).long(), dim=-1, stable=True)[1])
    sources, virtual = place([(q, kv, idx)], d)
    out = OPS.sparse_attn(q, sources, virtual, sink, d**-0.5)
    assert torch.equal(out, reference(q, kv, idx, sink, d**-0.5))
    assert not torch.equal(reference(q, kv, compact, sink, d**-0.5), out)

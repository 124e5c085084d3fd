"""sparse_attn: sparse MQA with a per-head sink over KV rows gathered from several sources by virtual row id.

Twin: `parity.reference.kernels.sparse_attn(q [1, s, h, d], kv [1, n, d], sink, idx [1, s, k], scale)`, called by
`ref.Attention.forward` with one request's own KV layout. The op gets the flat queries `[T, h, d]`, a tuple of
sources (chunk KV, window ring, entry pool) and `idx [T, K]` into their virtual concatenation (-1 = none, rows
padded with trailing -1 to the batch's widest list). Each query must see the same rows in the same order, so the
same 64-slot blocks, as in its request's reference call.

How a non-bitwise backend is judged (`judge`): the twin's block structure is replayed in float64 (the same fp32
scores, running max, fp32 P and bf16 P) to get the float64 golden and, per output element,
- a flip allowance: a P whose fp32 value lies within the kernel's possible error of a bf16 rounding midpoint may be
  rounded the other way by a kernel whose MMAs sum in another order (spec §12.3); each such slot allows one bf16 ulp
  of P times |v| / l on its head's outputs;
- a noise floor 2^-18 * sum_i |P_i v_i| / l (plus the P error bound): another fp32 summation order of the P . V
  product. Where it exceeds half a bf16 ulp of the output, the output nearly cancels and its own ulp says nothing.
Every other element is judged by `check` (the twin's error + 1 ulp of the float64 golden); the rest must stay
within those explicit allowances. A torch backend is judged by `check` alone (bitwise).
"""

import pytest
import torch
import torch.nn.functional as F

from parity.optimized.ops.sparse_attn import gather_rows, sparse_attn_torch
from parity.optimized.ops.triton import sparse_attn as triton_sparse_attn
from parity.optimized.ops.triton import sparse_attn_wgmma
from parity.reference import kernels
from parity.reference import model as ref
from tests.optimized.ops.conftest import check

OP = "sparse_attn"

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


def device_of(impl) -> str:
    return "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"


def run(impl, q, sources, idx, sink, scale, **kwargs):
    """The backend on its device (CUDA for triton where present); the result back on the CPU."""
    dev = device_of(impl)
    out = impl(q.to(dev), tuple(s.to(dev) for s in sources), idx.to(dev), sink.to(dev), scale, **kwargs)
    return out.cpu()


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


# ---- the judge -------------------------------------------------------------------------------------------------


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """float64 size of one bf16 unit in the last place at |x|."""
    mag = x.abs().to(torch.bfloat16)
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).to(torch.float32)  # the twin's correctly rounded fp32 exp


def replay(q, rows, valid, sink, scale, gamma):
    """float64 replay of the twin's 64-slot blocks for every query: (golden [T, h, d], flip allowance, noise floor).

    q [T, h, d] bf16, rows [T, K, d] bf16 (each query's gathered rows, zeros where missing), valid [T, K].
    `gamma`: the kernel's score error in units of 2^-24 * sum_d |q_d k_d| (its MMA accumulation order)."""
    t, h, d = q.shape
    k = rows.shape[1]
    f32 = torch.float32
    q64, v64 = q.double(), rows.double()
    scores = torch.einsum("thd,tkd->thk", q64, v64).to(f32)  # exact dot products rounded once, as the twin
    absum = torch.einsum("thd,tkd->thk", q64.abs(), v64.abs())
    vmask = valid[:, None, :]
    scores = torch.where(vmask, scores, float("-inf")) * torch.tensor(scale, dtype=f32)
    # relative error bound of the kernel's fp32 P_i from its own score and its exp (~2 ulp); the running max's
    # error moves every P of the row alike (it cancels in o = acc / l but may still flip a bf16 rounding)
    eps = 2.0**-22 + gamma * 2.0**-24 * scale * absum  # [T, h, K]
    m = torch.full((t, h), float("-inf"), dtype=f32)
    m_eps = torch.zeros(t, h, dtype=torch.float64)  # the score error bound of the slot that holds the running max
    l64 = torch.zeros(t, h, dtype=torch.float64)
    acc = torch.zeros(t, h, d, dtype=torch.float64)
    coef = torch.zeros(t, h, k, dtype=torch.float64)  # bf16(P_i) times the later blocks' alphas
    ucoef = torch.zeros(t, h, k, dtype=torch.float64)  # one bf16 ulp of an ambiguous P_i, same scaling
    for b0 in range(0, k, kernels.SPARSE_ATTN_BLOCK):
        blk = slice(b0, b0 + kernels.SPARSE_ATTN_BLOCK)
        s = scores[..., blk]
        blk_max, arg = s.max(-1)
        m_new = torch.maximum(m, blk_max)
        m_eps = torch.where(blk_max > m, (eps[..., blk] - 2.0**-22).gather(-1, arg[..., None])[..., 0], m_eps)
        alpha = _exp(m - m_new).double()
        p = _exp(s - m_new[..., None])  # fp32, the twin's
        pb = p.to(torch.bfloat16).double()
        lower = (p.view(torch.int32) & -65536) | 0x8000  # the bf16 rounding midpoint at or below p
        margin = (p.double() - lower.view(f32).double()).abs() / p.double()
        ambiguous = vmask[..., blk] & (p > 0) & (margin < eps[..., blk] + m_eps[..., None])
        l64 = l64 * alpha + p.double().sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("thk,tkd->thd", pb, v64[:, blk])
        coef, ucoef = coef * alpha[..., None], ucoef * alpha[..., None]
        coef[..., blk] = pb
        ucoef[..., blk] = torch.where(ambiguous, bf16_ulp(p.double()), 0.0)
        m = m_new
    total = l64 + torch.exp(sink.double() - m.double())
    golden = acc / total[..., None]
    flip = torch.einsum("thk,tkd->thd", ucoef / total[..., None], v64.abs())
    mass = torch.einsum("thk,tkd->thd", coef / total[..., None], v64.abs())
    eps_row = torch.where(vmask, eps, 0.0).amax(-1, keepdim=True) if k else torch.zeros(t, h, 1)
    noise = (2.0**-18 + 2 * eps_row) * mass  # another P . V summation order, and P errors of up to eps_row
    return golden, flip, noise


def judge(impl, got, want, q, sources, idx, sink, scale, min_strict=0.5):
    """`check` for a bitwise backend; otherwise `check` on every output the kernel's rounding freedom cannot move
    by more than 1 ulp, and explicit allowances on the others (module docstring)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan()), "NaN at other places than the twin's"
    finite = ~want.isnan()  # (torch.equal calls NaN unequal to itself: compare the rest)
    if impl.bitwise:
        check(impl, got[finite], want[finite])
        return
    # measured on the interpreter's BLAS: < 2; Hopper's truncating MMA accumulation is bounded by ~16 at d = 128
    gamma = 8.0 if device_of(impl) == "cuda" else 4.0
    rows = gather_rows(tuple(s.cpu() for s in sources), idx.cpu())
    golden, flip, noise = replay(q, rows, idx.cpu() >= 0, sink, scale, gamma)
    strict = finite & (flip == 0) & (noise < bf16_ulp(golden) / 2)
    check(impl, got[strict], want[strict], golden=golden[strict])
    loose = finite & ~strict
    g, a, b = golden[loose], want[loose].double(), got[loose].double()
    excess = (b - g).abs() - ((a - g).abs() + flip[loose] + noise[loose] + bf16_ulp(g))
    assert not (excess > 0).any(), f"{int((excess > 0).sum())} outputs beyond their flip/noise allowance"
    # the explicit allowances must stay the exception, or the test says little
    assert int(strict.sum()) >= min_strict * int(finite.sum()), (int(strict.sum()), int(finite.sum()))


def twin_of(q, sources, idx, sink, scale):
    """The twin per query on its own gathered rows (what the torch backend computes; bitwise per query)."""
    return sparse_attn_torch(q, sources, idx, sink, scale)


# ---- the twin's layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("specs", "h", "d"), PARAMS)
def test_ragged_matches_reference_per_request(impl, specs, h, d):
    reqs = [request(*spec, h, d) for spec in specs]
    sink, scale = torch.randn(h), d**-0.5
    sources, idx = place(reqs, d)
    q = torch.cat([r[0] for r in reqs])
    out = run(impl, q, sources, idx, sink, scale)
    expected = torch.cat([reference(q, kv, i, sink, scale) for q, kv, i in reqs])
    assert out.dtype == torch.bfloat16 and out.shape == (idx.shape[0], h, d)
    judge(impl, out, expected, q, sources, idx, sink, scale)


def test_reference_prefill_layout(impl, ref_model):
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
    sources = (kv, ring, entries)
    out = run(impl, q, sources, virtual, attn.attn_sink, attn.softmax_scale)
    judge(impl, out, expected, q, sources, virtual, attn.attn_sink, attn.softmax_scale)


def decode_request(p, ratio, topk, h, d, ring_slot):
    """One decode step at position p laid out as the reference decode (cache = [128-slot ring, entries]) and as
    the op sees it (ring rows of slot `ring_slot` in a shared ring, entries in a pool)."""
    win = 128
    q = torch.randn(1, h, d).to(torch.bfloat16)
    cache = torch.randn(win + (p + 1) // ratio + 1, d).to(torch.bfloat16)
    window = ref.get_window_topk_idxs(win, 1, 1, p)[0]  # [1, 128] ring slots, ring order
    n_entries = (p + 1) // ratio
    if ratio == 4:  # an indexer's top-k: a random subset of the visible entries, -1 padded like the model's
        chosen = torch.randperm(n_entries)[: min(topk, n_entries)]
        entries = F.pad(chosen, (0, min(topk, n_entries) - chosen.numel()), value=-1)[None]
    else:
        entries = torch.arange(n_entries)[None]
    idx = torch.cat([window, torch.where(entries < 0, -1, entries + win)], dim=1)
    return q, cache, idx, ring_slot


@pytest.mark.parametrize(
    "positions",
    [
        pytest.param(((126, 4), (127, 4), (128, 4)), id="window-127-128-129"),
        pytest.param(((2, 4), (3, 4), (4, 4)), id="compress-3-4-5"),
        pytest.param(((126, 128), (127, 128), (128, 128), (300, 128)), id="hca-127-128-129"),
        pytest.param(((5, 4), (200, 4), (0, 4)), id="ragged-topk"),
    ],
)
def test_decode_rows_match_reference_decode(impl, positions):
    # several requests' decode steps in one launch: each row is the reference decode's list into its own cache
    h, d, win = 4, 128, 128
    reqs = [decode_request(p, ratio, 16, h, d, slot) for slot, (p, ratio) in enumerate(positions)]
    ring = torch.randn(len(reqs) * win, d).to(torch.bfloat16)
    pool_rows, lists, at = [], [], len(reqs)  # chunk KV: one (unused here) row per query
    for _, cache, idx, slot in reqs:
        ring[slot * win : (slot + 1) * win] = cache[:win]
        pool_rows.append(cache[win:])
        n_pool = sum(x.shape[0] for x in pool_rows[:-1])
        virt = torch.where(idx < win, at + slot * win + idx, at + len(reqs) * win + n_pool + idx - win)
        lists.append(torch.where(idx < 0, -1, virt))
    width = max(x.shape[1] for x in lists)
    idx = torch.cat([F.pad(x, (0, width - x.shape[1]), value=-1) for x in lists])
    q = torch.cat([r[0] for r in reqs])
    sources = (torch.randn(len(reqs), d).to(torch.bfloat16), ring, torch.cat(pool_rows))
    sink, scale = torch.randn(h), d**-0.5
    out = run(impl, q, sources, idx, sink, scale)
    expected = torch.cat([reference(q, cache, i, sink, scale) for q, cache, i, _ in reqs])
    judge(impl, out, expected, q, sources, idx, sink, scale)


# ---- awkward inputs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [3, 4, 5, 127, 128, 129])
def test_prefill_lists_at_window_and_compress_boundaries(impl, s):
    # an HCA-style prefill (ratio 4 rule, every visible entry): early rows have an empty or partly -1 entry part
    h, d, ratio = 2, 64, 4
    q = torch.randn(s, h, d).to(torch.bfloat16)
    kv = torch.randn(s, d).to(torch.bfloat16)
    entries = torch.randn(s // ratio, d).to(torch.bfloat16)
    idx = torch.cat([ref.get_window_topk_idxs(128, 1, s, 0), ref.get_compress_topk_idxs(ratio, 1, s, 0, s)], -1)[0]
    sink, scale = torch.randn(h), d**-0.5
    expected = reference(q, torch.cat([kv, entries]), idx, sink, scale)
    sources = (kv, entries)
    out = run(impl, q, sources, idx, sink, scale)
    judge(impl, out, expected, q, sources, idx, sink, scale)


def test_all_invalid_rows_and_empty_lists(impl):
    # a row with no valid slot is NaN in the twin (exp(-inf - -inf)); an empty list (K = 0) is 0 / exp(sink)
    h, d = 4, 64
    q, kv, idx = request(6, 30, 70, h, d)
    idx[2] = -1  # all invalid
    idx[4, :64] = -1  # the first block invalid: the twin's NaN propagates
    sink, scale = torch.randn(h), d**-0.5
    sources = (kv[:10], kv[10:])
    out = run(impl, q, sources, idx, sink, scale)
    expected = reference(q, kv, idx, sink, scale)
    assert expected[2].isnan().all() and expected[4].isnan().all()
    judge(impl, out, expected, q, sources, idx, sink, scale)
    empty = run(impl, q, sources, idx[:, :0], sink, scale)
    check(impl, empty, reference(q, kv, idx[:, :0], sink, scale))


def test_virtual_ids_past_the_int32_range(impl):
    # a source of 2^31 rows (an expanded view: one real row) pushes the next source's ids past int32
    h, d = 4, 64
    dev = device_of(impl)
    q, kv, idx = request(9, 40, 70, h, d)
    chunk, ring_row = kv[:10], torch.randn(1, d).to(torch.bfloat16)
    huge = 2**31 + 3
    base = 10 + huge
    virt = torch.where(idx < 10, idx, base + idx - 10)
    virt[:, 1] = 10 + huge - 1  # the last row of the huge source
    virt[idx < 0] = -1
    sources = (chunk, ring_row.expand(huge, d), kv[10:])
    out = impl(q.to(dev), (chunk.to(dev), ring_row.to(dev).expand(huge, d), kv[10:].to(dev)), virt.to(dev),
               torch.ones(h).to(dev), d**-0.5).cpu()  # fmt: skip
    expected = twin_of(q, sources, virt, torch.ones(h), d**-0.5)
    judge(impl, out, expected, q, sources, virt, torch.ones(h), d**-0.5)


def test_output_is_fully_written(impl, monkeypatch):
    # every allocation made during the call starts as NaN: an element the kernel never writes shows up
    real = torch.empty

    def poisoned(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() and t.element_size() > 1 else t

    h, d = 3, 64
    q, kv, idx = request(11, 50, 90, h, d)
    sink, scale = torch.randn(h), d**-0.5
    sources = (kv[:20], kv[20:])
    monkeypatch.setattr(torch, "empty", poisoned)
    out = run(impl, q, sources, idx, sink, scale)
    monkeypatch.undo()
    assert not out.isnan().any()
    judge(impl, out, reference(q, kv, idx, sink, scale), q, sources, idx, sink, scale)


def test_requests_do_not_depend_on_batchmates_placement_or_padding(impl):
    h, d = 4, 128
    sink = torch.randn(h)
    a = request(37, 150, 70, h, d)
    alone_sources, alone_idx = place([a], d, spare=0)
    alone = run(impl, a[0], alone_sources, alone_idx, sink, d**-0.5)
    for before, after in (((5, 20, 130),), ()), ((), ((1, 3, 3), (2, 10, 200))), (((1, 1, 1),), ((3, 9, 9),)):
        reqs = [request(*x, h, d) for x in before] + [a] + [request(*x, h, d) for x in after]
        sources, idx = place(reqs, d)
        out = run(impl, torch.cat([r[0] for r in reqs]), sources, idx, sink, d**-0.5)
        first = sum(x[0] for x in before)
        assert torch.equal(out[first : first + 37], alone)


def two_source_request():
    """5 queries, 4 heads of 128, KV from two sources (a chunk of 7 rows and the rest), one row's tail unused."""
    h, d = 4, 128
    q, kv, idx = request(5, 60, 130, h, d)
    idx[3, 70:] = -1
    return q, kv, idx, torch.randn(h), d**-0.5, (kv[:7], kv[7:])


def test_one_query_kernel_matches_the_batched_one(impl):
    # the triton backend has a one-query-per-program kernel (the GPU's) and a batched one (the interpreter's):
    # the same math per query, so the same bits where the same matmul runs both (the interpreter's BLAS); compiled,
    # they use different MMA instructions (wgmma vs mma.sync), so each is judged against the twin
    if impl.backend != "triton":
        pytest.skip("only the triton backend has two kernels")
    q, kv, idx, sink, scale, sources = two_source_request()
    one = run(impl, q, sources, idx, sink, scale, tokens_per_program=1)
    batched = run(impl, q, sources, idx, sink, scale, tokens_per_program=2)  # 2: fits a GPU's shared memory
    want = reference(q, kv, idx, sink, scale)
    judge(impl, one, want, q, sources, idx, sink, scale)
    judge(impl, batched, want, q, sources, idx, sink, scale)
    if device_of(impl) == "cpu":
        assert torch.equal(one, batched)


def test_two_output_parts_match_the_twin(impl):
    # the output dims of each head split over two programs (`config` parts = 2, a GPU candidate at d = 512): each
    # program computes the full scores, its own half-d product first, and is judged against the twin like the
    # one-program kernel
    if impl.backend != "triton":
        pytest.skip("only the triton backend has output parts")
    q, kv, idx, sink, scale, sources = two_source_request()
    two = run(impl, q, sources, idx, sink, scale, config=(16, 4, 2, 2))
    judge(impl, two, reference(q, kv, idx, sink, scale), q, sources, idx, sink, scale)
    with pytest.raises(ValueError):  # a head dim the halves cannot split
        run(impl, q[..., :96], (kv[:7, :96], kv[7:, :96]), idx, sink, scale, config=(16, 4, 2, 2))


def test_model_shape_heads_64_dim_512(impl):
    # V4-Flash's attention shape: the configuration the GPU runs at d = 512 (`default_config`) against the twin
    h, d = 64, 512
    reqs = [request(2, 150, 130, h, d), request(1, 70, 70, h, d)]
    sink, scale = torch.randn(h), d**-0.5
    sources, idx = place(reqs, d)
    q = torch.cat([r[0] for r in reqs])
    out = run(impl, q, sources, idx, sink, scale)
    expected = torch.cat([reference(q, kv, i, sink, scale) for q, kv, i in reqs])
    judge(impl, out, expected, q, sources, idx, sink, scale)


def on_sm90() -> bool:
    return torch.cuda.is_available() and sparse_attn_wgmma.on_sm90(torch.device("cuda"))


@pytest.mark.skipif(not on_sm90(), reason="the Gluon kernel runs on sm_90 only (Gluon has no CPU interpreter)")
def test_sm90_kernel_and_triton_kernel_both_match_the_twin(impl):
    # on sm_90 the op runs the Gluon kernel (`sparse_attn_wgmma`); a given `config` runs the Triton kernel: both are
    # judged against the twin at the model's shape, over lists of several blocks with holes and ragged ends
    if impl.backend != "triton":
        pytest.skip("only the triton backend has the Gluon kernel")
    h, d = 64, 512
    reqs = [request(3, 150, 200, h, d), request(1, 70, 70, h, d), request(2, 300, 260, h, d)]
    sink, scale = torch.randn(h), d**-0.5
    sources, idx = place(reqs, d)
    q = torch.cat([r[0] for r in reqs])
    assert sparse_attn_wgmma.fits(q.cuda(), [s.cuda() for s in sources])
    expected = torch.cat([reference(q, kv, i, sink, scale) for q, kv, i in reqs])
    for kwargs in ({}, {"config": triton_sparse_attn.default_config(h, d)}):
        judge(impl, run(impl, q, sources, idx, sink, scale, **kwargs), expected, q, sources, idx, sink, scale)


@pytest.mark.skipif(not on_sm90(), reason="the Gluon kernel runs on sm_90 only (Gluon has no CPU interpreter)")
def test_rows_the_sm90_kernel_cannot_copy_take_the_triton_kernel(impl):
    # cp.async moves 16 bytes: a source whose rows are not 8-value aligned (or a head dim outside DIMS) is run by
    # the Triton kernel, and judged the same
    if impl.backend != "triton":
        pytest.skip("only the triton backend has the Gluon kernel")
    h, d = 4, 128
    q, kv, idx = request(9, 60, 130, h, d)
    wide = torch.zeros(60, d + 4, dtype=torch.bfloat16, device="cuda")  # made on the GPU: a copy would be dense
    wide[:, :d] = kv.cuda()
    sources = (kv[:7].cuda(), wide[7:, :d])  # row stride d + 4
    assert not sparse_attn_wgmma.fits(q.cuda(), list(sources))
    assert not sparse_attn_wgmma.fits(q[..., :96].cuda(), [kv[:, :96].cuda()])
    sink, scale = torch.randn(h), d**-0.5
    out = impl(q.cuda(), sources, idx.cuda(), sink.cuda(), scale).cpu()
    judge(impl, out, reference(q, kv, idx, sink, scale), q, sources, idx, sink, scale)


def test_the_sm90_kernel_is_not_chosen_off_the_gpu():
    q = torch.zeros(2, 64, 512, dtype=torch.bfloat16)
    assert not sparse_attn_wgmma.fits(q, [torch.zeros(8, 512, dtype=torch.bfloat16)])


def test_gather_reads_zeros_for_missing_rows():
    src = (torch.ones(2, 4), 2 * torch.ones(3, 4))
    got = gather_rows(src, torch.tensor([[4, -1, 0, 2]]))
    assert torch.equal(got[0, :, 0], torch.tensor([2.0, 0.0, 1.0, 2.0]))


# ---- planted bugs: each must fail the judge --------------------------------------------------------------------


def _planted(impl, bug):
    h, d = 4, 128
    q, kv, idx = request(37, 150, 130, h, d)
    sink, scale = torch.randn(h) + 2.0, d**-0.5  # a sink worth noticing
    sources, virtual = place([(q, kv, idx)], d)
    expected = reference(q, kv, idx, sink, scale)
    if bug == "sink dropped":
        out = run(impl, q, sources, virtual, torch.full((h,), float("-inf")), scale)
    elif bug == "off-by-one slot":
        out = run(impl, q, sources, torch.where(virtual < 0, -1, (virtual + 1) % sum(len(s) for s in sources)), sink,
                  scale)  # fmt: skip
    elif bug == "wrong scale exponent":
        out = run(impl, q, sources, virtual, sink, scale * 2)
    elif bug == "wrong row stride":
        # the entry pool is every other row of a buffer (row stride 2d); a kernel that assumes contiguous rows reads
        # the wrong ones: hand it the same storage with stride d
        buf = torch.randn(2 * sources[2].shape[0], d).to(torch.bfloat16)
        buf[::2] = sources[2]
        sources = (sources[0], sources[1], buf[::2])
        bad = buf.as_strided(sources[2].shape, (d, 1))
        out = run(impl, q, (sources[0], sources[1], bad), virtual, sink, scale)
    elif bug == "compacted lists":
        # packing the valid slots to the front changes which rows share a 64-slot block (the running max): the
        # twin itself differs in the last bits, below a non-bitwise kernel's rounding freedom
        if not impl.bitwise:
            pytest.skip("block composition only moves bf16 roundings of P: visible to a bitwise backend only")
        compact = torch.gather(idx, 1, torch.sort((idx < 0).long(), dim=-1, stable=True)[1])
        out, expected = run(impl, q, sources, virtual, sink, scale), reference(q, kv, compact, sink, scale)
    with pytest.raises(AssertionError):
        judge(impl, out, expected, q, sources, virtual, sink, scale)


@pytest.mark.parametrize(
    "bug", ["sink dropped", "off-by-one slot", "wrong scale exponent", "wrong row stride", "compacted lists"]
)
def test_planted_bug_is_caught(impl, bug):
    _planted(impl, bug)

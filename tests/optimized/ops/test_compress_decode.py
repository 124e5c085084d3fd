"""compress_decode: a compressor's whole decode step (state machine, pooling of the completed blocks, norm / RoPE /
fake-quant, paged write) for one token of each of D requests.

Twin: per request, the reference's `Compressor.decode_block`, its pooling `(kv * score.softmax(dim)).sum(dim)` of
the completed block and the tail after it (`RMSNorm`, `apply_rotary_emb`, then `rotate_activation` + FP4 or the
FP8 `act_quant`), the entry written to the request's pool row. What each backend claims, tested bit for bit on the
state (NaN-poisoned free slots), the entries and the whole pool (untouched rows keep their bits):
- torch: that reference code;
- triton: the registered Triton compress_state, compress_pool and compress_finish kernels run in sequence, then
  the write (each of those is tested against its own twin in its own file, with its stated tolerance).
Awkward cases: one request, none or all completing, token rows out of order, scattered slots, ratio 4 with the
overlap (the attention's compressor, and the indexer's with Hadamard + FP4), ratio 128 without.
"""

import pytest
import torch

from parity.optimized.ops.triton import compress_decode as tri
from parity.optimized.ops.triton import compress_finish as tri_finish
from parity.optimized.ops.triton import compress_pool as tri_pool
from parity.optimized.ops.triton import compress_state as tri_state
from tests.optimized.ops.test_compress_finish import reference_tail
from tests.optimized.ops.test_compress_state import make_case
from tests.optimized.ops.test_compress_state import twin as state_twin

OP = "compress_decode"
POOL_ROWS = 50


def compressor(ref_model, kind: str):
    attn = ref_model.layers[1 if kind != "hca" else 2].attn
    return attn.indexer.compressor if kind == "indexer" else attn.compressor


def full_case(comp, positions, out_of_order=False, seed=0):
    """make_case's projections and state, a pool of random bf16 rows, the done requests' pool rows and RoPE table
    rows (their block's first position), a RoPE table."""
    kv, score, rows, pos, slots, state_kv, state_score = make_case(comp, positions, rows_out_of_order=out_of_order)
    g = torch.Generator().manual_seed(seed + 1)
    ratio, d = comp.compress_ratio, comp.head_dim
    done = [(p + 1) % ratio == 0 for p in positions]
    pool = torch.randn(POOL_ROWS, d, generator=g).to(torch.bfloat16)
    pool_rows = torch.randperm(POOL_ROWS, generator=g)[: sum(done)]
    entry_pos = torch.tensor([p // ratio * ratio for p, x in zip(positions, done) if x], dtype=torch.int64)
    table = torch.polar(torch.ones(400, 32), torch.rand(400, 32, generator=g) * 6.3)  # [S, rd/2] complex64
    return (kv, score, rows, pos, slots, state_kv, state_score), pool, pool_rows, entry_pos, table


def reference(comp, case, pool, pool_rows, entry_pos, table, fp8):
    """The twin: decode_block per request, the reference pooling and tail, the paged write."""
    blocks, state_kv, state_score = state_twin(comp, *case)
    pool = pool.clone()
    entries = None
    if blocks is not None:
        pooled = (blocks[0] * blocks[1].softmax(dim=-2)).sum(dim=-2)  # [M, d]
        segments = tuple(range(pooled.shape[0] + 1))
        entries = reference_tail(pooled, comp.norm.weight, comp.norm.eps, segments, table, entry_pos, comp.rotate,
                                 comp.scale_fmt, comp.scale_dtype, fp8)  # fmt: skip
        pool[pool_rows] = entries
    return entries, state_kv, state_score, pool


def triton_chain(comp, case, pool, pool_rows, entry_pos, table, fp8, device):
    """The three Triton kernels in sequence, then the write."""
    kv, score, rows, pos, slots, state_kv, state_score = (_to(t, device) for t in case)
    args = _state_args(comp, kv, score, rows, pos, slots, state_kv, state_score, device)
    blocks = tri_state.launch(*args)
    pool = pool.clone().to(device)
    entries = None
    if blocks is not None:
        pooled = tri_pool.compress_pool(*blocks)
        entries = tri_finish.launch(pooled, comp.norm.weight.to(device), comp.norm.eps, table.to(device),
                                    entry_pos.to(device), comp.rotate, comp.scale_fmt, fp8)  # fmt: skip
        pool[pool_rows.to(device)] = entries
    return _cpu(entries), state_kv.cpu(), state_score.cpu(), pool.cpu()


def _to(t, device):
    return None if t is None else t.clone().to(device)


def _cpu(t):
    return None if t is None else t.cpu()


def _state_args(comp, kv, score, rows, pos, slots, state_kv, state_score, device):
    ratio = comp.compress_ratio
    done = [s for p, s in zip(pos.tolist(), slots.tolist()) if (p + 1) % ratio == 0]
    return (kv, score, comp.ape.detach().to(device), rows, pos % ratio, slots,
            torch.tensor(done, device=device) if done else None, state_kv, state_score, comp.overlap)  # fmt: skip


def call(fn, comp, case, pool, pool_rows, entry_pos, table, fp8, device):
    kv, score, rows, pos, slots, state_kv, state_score = (_to(t, device) for t in case)
    pool = pool.clone().to(device)
    entries = fn(
        *_state_args(comp, kv, score, rows, pos, slots, state_kv, state_score, device),
        comp.norm.weight.to(device), comp.norm.eps, table.to(device), entry_pos.to(device), comp.rotate,
        comp.scale_fmt, comp.scale_dtype, fp8, pool, pool_rows.to(device),
    )  # fmt: skip
    return _cpu(entries), state_kv.cpu(), state_score.cpu(), pool.cpu()


def differences(got, want) -> list[str]:
    names = ("entries", "kv state", "score state", "pool")
    out = []
    for name, g, w in zip(names, got, want):
        if (g is None) != (w is None) or (g is not None and not _same_bits(g, w)):
            out.append(name)
    return out


def _same_bits(a, b) -> bool:
    view = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


CASES = [
    pytest.param("attn", [3], False, id="r4-one-completes"),
    pytest.param("attn", [5], False, id="r4-one-none"),
    pytest.param("attn", [3, 7, 11], False, id="r4-all-complete"),
    pytest.param("attn", [4, 9, 18, 3, 131, 255, 6], False, id="r4-mixed"),
    pytest.param("indexer", [4, 9, 18, 3, 131, 255, 6], False, id="r4-indexer-mixed"),
    pytest.param("indexer", [127, 6, 3], True, id="r4-indexer-rows-out-of-order"),
    pytest.param("hca", [127], False, id="r128-completes"),
    pytest.param("hca", [5, 127, 254, 255, 130], True, id="r128-mixed-out-of-order"),
]


@pytest.mark.parametrize(("kind", "positions", "out_of_order"), CASES)
@pytest.mark.parametrize("fp8", [True, False])
def test_equals_what_the_backend_claims(impl, ref_model, kind, positions, out_of_order, fp8):
    comp = compressor(ref_model, kind)
    case, pool, pool_rows, entry_pos, table = full_case(comp, positions, out_of_order)
    device = "cuda" if impl.backend != "torch" and torch.cuda.is_available() else "cpu"
    got = call(impl, comp, case, pool, pool_rows, entry_pos, table, fp8, device)
    if impl.backend == "torch":
        want = reference(comp, case, pool, pool_rows, entry_pos, table, fp8)
    else:
        want = triton_chain(comp, case, pool, pool_rows, entry_pos, table, fp8, device)
    assert differences(got, want) == []
    if any((p + 1) % comp.compress_ratio == 0 for p in positions):
        untouched = torch.ones(POOL_ROWS, dtype=torch.bool)
        untouched[pool_rows] = False
        assert _same_bits(got[3][untouched], pool[untouched]), "rows outside pool_rows were written"


@pytest.mark.parametrize(
    ("plant", "kind", "what"), [(1, "attn", "kv state"), (2, "indexer", "pool"), (3, "attn", "entries")]
)
def test_triton_planted_bugs_are_caught(ref_model, plant, kind, what):
    # 1: the overlap shift skipped; 2: entry m written to pool row m; 3: RoPE on the first rd dims
    comp = compressor(ref_model, kind)
    case, pool, pool_rows, entry_pos, table = full_case(comp, [4, 9, 18, 3, 131, 255, 6])
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def planted(*args):
        return tri.launch(*args[:16], *args[17:], plant=plant)  # launch takes no scale dtype

    got = call(planted, comp, case, pool, pool_rows, entry_pos, table, True, device)
    assert what in differences(got, triton_chain(comp, case, pool, pool_rows, entry_pos, table, True, device))

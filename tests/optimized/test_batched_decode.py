"""A step of several requests against the same requests run one at a time through the same model: the step's output
streams and every cache tensor (window rings, entry pools, compressor state) bit for bit.

The step's index lists, ring writes and compressor state machine are built for all requests at once
(`OptAttention._sparse_idx`, `_write_ring`, `compress_all`); a request alone runs the same code as a batch of one.
The positions straddle the compress ratios (a block completes at 4k+3 for CSA, 128k+127 for HCA) and the window
(128: position >= 128 wraps the ring), so that in one step some requests complete a block and others do not.
"""

import copy
from dataclasses import replace

import pytest
import torch

from parity.checkpoint import build_model
from parity.optimized import batch as batch_module
from parity.optimized import model as opt_model
from parity.optimized.batch import Batch, Chunk, make_batch
from parity.optimized.cache import PagedCache
from parity.optimized.model import OptCompressor, OptimizedTransformer

# (context already cached, tokens in the step)
DECODES = [
    (127, 1),  # completes a CSA and an HCA block, fills the ring
    (130, 1),  # ring wrapped, no block
    (255, 1),  # completes both blocks, ring wrapped
    (6, 1),  # nothing completes
    (0, 9),  # a prefill next to the decodes (its window list is 9 wide, its entries start there)
    (7, 1),  # completes a CSA block only
    (200, 1),  # ring wrapped, no block
]
# MTP-verification-shaped chunks (decode-exact segments), a decode and a chunk longer than the window
CHUNKS = [
    (126, 2),  # both blocks complete at the second token
    (127, 2),  # both complete at the first: the second token rewrites the HCA state the block was read from
    (127, 1),  # completes its entries at token offset 0, before request 0's at offset 1
    (254, 2),
    (5, 3),
    (10, 130),  # only its last 128 tokens stay in the ring
]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return build_model(tiny_ckpt, factory=OptimizedTransformer)[0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    # NaN (the poison of rows nobody owns) compares equal to itself bit for bit
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _mismatches(a: PagedCache, b: PagedCache) -> list[str]:
    out = []
    for name in ("window", "entries", "index_entries"):
        for layer, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            if x is not None and not torch.equal(_bits(x), _bits(y)):
                out.append(f"{name}[{layer}]")
    for name in ("state", "index_state"):
        for layer, (x, y) in enumerate(zip(getattr(a, name), getattr(b, name))):
            if x is not None and not (
                torch.equal(_bits(x.kv), _bits(y.kv)) and torch.equal(_bits(x.score), _bits(y.score))
            ):
                out.append(f"{name}[{layer}]")
    return out


class Setup:
    """Requests with their contexts prefilled alone, in slots and blocks that do not follow the batch order."""

    def __init__(self, model, specs):
        args = model.args
        self.model, self.specs = model, specs
        g = torch.Generator().manual_seed(11)
        self.tokens = [torch.randint(0, args.vocab_size, (c + n,), generator=g).tolist() for c, n in specs]
        self.cache = PagedCache(args, max_requests=len(specs) + 2, num_blocks=64)
        self.cache.alloc_slot()  # slot 0 stays unused
        self.slots = [self.cache.alloc_slot() for _ in specs][::-1]
        # blocks handed out round-robin: each request's table is scattered over the pool
        self.blocks = {r: [[] for _ in specs] for r in self.cache.free_blocks}
        for r, tables in self.blocks.items():
            need = [self.cache.blocks_needed(r, c + n) for c, n in specs]
            for k in range(max(need)):
                for i in reversed(range(len(specs))):
                    if k < need[i]:
                        tables[i] += self.cache.alloc_blocks(r, 1)
        for i, (c, _) in enumerate(specs):
            if c:
                self.run([i], prefill=True)

    def tables(self, seqs):
        out = {}
        for r, tables in self.blocks.items():
            width = max(1, *(len(tables[i]) for i in seqs))
            out[r] = torch.tensor([tables[i] + [-1] * (width - len(tables[i])) for i in seqs], dtype=torch.int32)
        return out

    def run(self, seqs, cache=None, prefill=False):
        chunks = []
        for i in seqs:
            c, _ = self.specs[i]
            start, tokens = (0, self.tokens[i][:c]) if prefill else (c, self.tokens[i][c:])
            chunks.append(Chunk(request_id=i, slot=self.slots[i], start_pos=start, tokens=tuple(tokens)))
        batch = make_batch(chunks, self.tables(seqs), per_token_after_context=True)
        return self.model(batch, self.cache if cache is None else cache)


def _batched_vs_alone(model, specs) -> list[str]:
    s = Setup(model, specs)
    alone_cache = copy.deepcopy(s.cache)
    h = s.run(range(len(specs)))
    h_alone = torch.cat([s.run([i], alone_cache) for i in range(len(specs))])
    return ([] if torch.equal(_bits(h), _bits(h_alone)) else ["output streams"]) + _mismatches(s.cache, alone_cache)


@pytest.mark.parametrize("specs", [pytest.param(DECODES, id="decodes"), pytest.param(CHUNKS, id="chunks")])
def test_batched_step_is_each_request_alone_bitwise(model, specs):
    assert _batched_vs_alone(model, specs) == []


def test_a_planted_slot_swap_in_the_batched_state_machine_is_caught(model, monkeypatch):
    decode_step = OptCompressor.decode_step

    def swapped(self, kv, score, step, state):
        # the first two requests' state slots exchanged in the batched gather/scatter (a batch of one is unaffected)
        if step.slots.numel() > 1:
            step = replace(step, slots=step.slots[[1, 0, *range(2, step.slots.numel())]])
        return decode_step(self, kv, score, step, state)

    monkeypatch.setattr(OptCompressor, "decode_step", swapped)
    found = _batched_vs_alone(model, DECODES)
    assert "output streams" in found and "state[1]" in found and "index_state[1]" in found


@pytest.mark.parametrize("plant", [False, True])
@pytest.mark.parametrize("specs", [pytest.param(DECODES, id="decodes"), pytest.param(CHUNKS, id="chunks")])
def test_index_lists_built_from_the_host_copy_give_the_same_bits(model, specs, plant, monkeypatch):
    # on a GPU the window lists, ring rows, HCA lists and the new entries' pool rows are built from `Batch.host`, a
    # CPU copy of the batch's metadata with its own derived cache, and copied over; on the CPU `host` is the batch
    # itself, so here the copy is forced. Planted: the copy's positions one ahead (what a host copy that went stale
    # by a step would hold)
    s = Setup(model, specs)
    other = copy.deepcopy(s.cache)
    h = s.run(range(len(specs)))
    host_copy = Batch.host_copy

    def copied(batch):
        b = host_copy(batch)
        return replace(b, positions=b.positions + 1) if plant else b

    monkeypatch.setattr(Batch, "host", property(copied))
    h_host = s.run(range(len(specs)), other)
    same = torch.equal(_bits(h), _bits(h_host)) and _mismatches(s.cache, other) == []
    assert same != plant


def test_hca_lists_built_on_the_device_start_from_the_host_window_lists(model, monkeypatch):
    # past HOST_BUILD_ENTRIES an HCA layer's lists are built on the device (here the batch itself, its `host` a forced
    # copy as above) while the window lists are built on the host: the same bits as lists built on the host, and
    # one window build per batch (the HCA build takes the host-built lists the other layers read, not a rebuild)
    s = Setup(model, DECODES)
    other = copy.deepcopy(s.cache)
    monkeypatch.setattr(Batch, "host", property(Batch.host_copy))
    h = s.run(range(len(DECODES)))
    window_rows_of, built = opt_model._window_rows_of, []
    monkeypatch.setattr(opt_model, "_window_rows_of", lambda *a: built.append(a[0]) or window_rows_of(*a))
    monkeypatch.setattr(batch_module, "HOST_BUILD_ENTRIES", 0)  # window lists walk no entries: still on the host
    h_device = s.run(range(len(DECODES)), other)
    assert torch.equal(_bits(h), _bits(h_device)) and _mismatches(s.cache, other) == []
    assert len(built) == 1

"""`PagedCache.release`: the slots and blocks of every request finishing in a step freed at once, exactly what they
held NaN-poisoned (a stale read must show) and nothing else touched."""

import torch

from parity.optimized.cache import PagedCache


def _zeroed(cache: PagedCache) -> PagedCache:
    """Every cache tensor set to 0 (a fresh cache is NaN, a newly allocated slot's scores -inf)."""
    tensors = cache.window + cache.entries + cache.index_entries
    tensors += [t for st in cache.state + cache.index_state if st is not None for t in (st.kv, st.score)]
    for t in tensors:
        if t is not None:
            t.zero_()
    return cache


def _nan_rows(t: torch.Tensor) -> list[int]:
    """Leading-dim indices whose rows are all NaN; every other row must be untouched (all zero)."""
    flat = t.flatten(1)
    nan, zero = flat.isnan().all(1), (flat == 0).all(1)
    assert bool((nan | zero).all()), "a row partly poisoned or changed"
    return nan.nonzero().flatten().tolist()


def test_release_poisons_exactly_the_freed_slots_and_blocks(tiny_args):
    cache = PagedCache(tiny_args, max_requests=4, num_blocks=8, block_size=4)
    slots = [cache.alloc_slot() for _ in range(4)]
    ratios = sorted(set(cache.free_blocks))
    held = {r: cache.alloc_blocks(r, 6) for r in ratios}
    freed = {r: [held[r][1], held[r][4]] for r in ratios}
    _zeroed(cache)
    cache.release([slots[1], slots[3]], freed)

    assert cache.free_slots == [slots[1], slots[3]]
    for r in ratios:
        assert cache.free_blocks[r] == [6, 7, *freed[r]]
    for ring in cache.window:
        assert _nan_rows(ring) == [slots[1], slots[3]]
    for st in filter(None, cache.state + cache.index_state):
        assert _nan_rows(st.kv) == _nan_rows(st.score) == [slots[1], slots[3]]
    for r, pool, ipool in zip(cache.ratios, cache.entries, cache.index_entries):
        for t in (pool, ipool):
            if t is not None:
                assert _nan_rows(t) == sorted(freed[r])


def test_release_of_nothing_changes_nothing(tiny_args):
    cache = _zeroed(PagedCache(tiny_args, max_requests=4, num_blocks=8, block_size=4))
    cache.release([], {r: [] for r in cache.free_blocks})
    for t in cache.window + cache.entries + cache.index_entries:
        assert t is None or _nan_rows(t) == []


def test_release_cost_does_not_grow_with_the_requests(tiny_args):
    # per-request release made a blocking index copy (a host sync on CUDA) and a fill per tensor per request: the
    # aten calls of one release must be the same for 1 and for 3 requests finishing together
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    costs = []
    for n in (1, 3):
        cache = PagedCache(tiny_args, max_requests=4, num_blocks=16, block_size=4)
        slots = [cache.alloc_slot() for _ in range(n)]
        blocks = {r: cache.alloc_blocks(r, 2 * n) for r in cache.free_blocks}
        Count.calls = 0
        with Count():
            cache.release(slots, blocks)
        costs.append(Count.calls)
    assert costs[0] == costs[1], costs

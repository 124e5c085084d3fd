"""Decoding requests placed after long contexts without running their prefills: the benches' long-context decode
steps (`bench/layer_speed.py --context`, `bench/decode_host.py`). A 64 x 64k prefill would take the bench longer
than the decode steps it measures; the step's host work and GPU time depend on the contexts' lengths (block
tables, index lists, the KV read), not on what the prefill would have written."""

import torch

from parity.optimized.engine import Engine


def place_decoding(engine: Engine, contexts, new_tokens: int, gen: torch.Generator, fill: bool = False) -> None:
    """One request per entry of `contexts` (prompt lengths), admitted and set as if its prompt were prefilled and
    its first token emitted (its KV blocks reserved, the MTP block caught up with it); nothing is computed. `fill`:
    the cache's rings, entry pools and compressor states get random finite values (the engine keeps unwritten rows
    NaN-poisoned, and a step over them would time NaN arithmetic and NaN top-k keys)."""
    vocab = engine.args.vocab_size
    for n in contexts:
        engine.add_request(torch.randint(0, vocab, (n,), generator=gen), new_tokens)
    engine._admit()
    if engine.waiting:
        raise ValueError(f"place_decoding: {len(contexts)} requests, {engine.config.max_requests} slots")
    for req in engine.running:
        req.num_computed = req.mtp_computed = len(req.prompt_ids)
        req.output.append(int(torch.randint(0, vocab, (1,), generator=gen)))
        engine._reserve(req, req.num_computed)
    if fill:
        cache = engine.cache
        states = [s for s in cache.state + cache.index_state if s is not None]
        for t in [*cache.window, *cache.entries, *cache.index_entries, *(x for s in states for x in (s.kv, s.score))]:
            if t is not None:
                t.normal_()

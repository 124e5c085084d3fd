"""The host's own work in a decode step at long contexts, on the CPU: the engine's bookkeeping and the batch's plans.

    python bench/decode_host.py [--batch 1 64] [--context 4096 65536] [--repeat 20] [--json out.json]

A GPU decode step is launched by the host; a graphed step of the layer bench spends more host time than GPU time
(docs/perf.md, layer rows), so every host millisecond of a step counts. The layer bench's prompts are 64 tokens; at
real contexts the host work that grows with them shows. This bench needs no GPU and runs no kernel: on the tiny
model (real window and ratios: 128, CSA 4 and HCA 128), `--batch` requests are placed after `--context` positions
without a prefill (`bench/placed.py`: their blocks reserved as a prefill would, the cache's values untouched), and
one decode step's host work is timed, median of `--repeat`:
- `schedule`: `Engine._schedule` and the block reservation of the step's positions;
- `batch`: the step's `Batch` (token rows, the block tables of every ratio);
- `plans`: each index plan the layers derive from the batch (`Batch.derived`), built as a step builds them (the
  window lists and the HCA lists on the host, the compressor plans, the CSA entry lists). The CSA entry list, and
  the HCA lists past `HOST_BUILD_ENTRIES` entries, are device builds (a handful of launches on a GPU): their CPU
  time here is the ops' own work, not the host's cost there, and the host total leaves them out.
"""

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.placed import place_decoding  # noqa: E402
from parity.checkpoint import build_model, write_checkpoint  # noqa: E402
from parity.config import ModelArgs  # noqa: E402
from parity.optimized import model as opt_model  # noqa: E402
from parity.optimized.cache import PagedCache  # noqa: E402
from parity.optimized.engine import Engine, EngineConfig  # noqa: E402

BLOCK = 16  # entries per pool block (EngineConfig's default)


def engine_at(args: ModelArgs, ckpt, batch: int, context: int) -> Engine:
    """An engine whose `batch` requests are all decoding after about `context` positions (each a token shorter)."""
    model, _ = build_model(ckpt, device=torch.device("cpu"), factory=lambda a: opt_model.OptimizedTransformer(a))
    blocks = batch * PagedCache.blocks_for(args, context + 64, BLOCK)
    engine = Engine(model, EngineConfig(max_requests=batch, num_blocks=blocks, block_size=BLOCK))
    place_decoding(engine, [context - i for i in range(batch)], 8, torch.Generator().manual_seed(0))
    return engine


def plan_builders(engine: Engine, cache) -> dict:
    """name -> fn(batch), or (fn, the plans a step has built before it): every plan a decode step's layers derive
    from its batch."""
    args, win = engine.args, engine.args.window_size
    ring_rows = cache.window[0].shape[0] * win
    topk = args.index_topk
    swa, hca = (next(layer.attn for layer in engine.model.layers if layer.attn.compress_ratio == r) for r in (0, 128))

    def hca_lists(b):  # the layer's own build, on the host or the device by `Batch.on_host`'s rule
        return hca._sparse_idx(b, cache, None, ring_rows)

    def window_first(b):  # what a step has built before an HCA layer: a window layer's lists (its first layer's)
        swa._sparse_idx(b, cache, None, ring_rows)
        return b

    return {
        "compressor plan, ratio 4": lambda b: opt_model._compress_plan(b, cache, 4),
        "compressor plan, ratio 128": lambda b: opt_model._compress_plan(b, cache, 128),
        "index plans (3 kinds)": lambda b: [
            opt_model._index_plan(b, win, r, k) for r, k in ((0, None), (4, topk), (128, None))
        ],
        "window lists (host)": lambda b: opt_model._window_rows_of(b.host, cache, win),
        "HCA lists": (hca_lists, window_first),
        "ring write rows (host)": lambda b: opt_model._ring_write_rows(b.host, cache, win),
        "CSA entry list (device build)": lambda b: opt_model._entry_gather(b, cache, 4),
    }


def median_ms(fn, repeat: int, setup=lambda: None) -> float:
    """Median wall ms of `fn(setup())`, `setup` untimed."""
    times = []
    for _ in range(repeat):
        arg = setup()
        t0 = time.perf_counter()
        fn(arg)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(args: ModelArgs, ckpt, batch: int, context: int, repeat: int) -> dict:
    engine = engine_at(args, ckpt, batch, context)
    plan = engine._schedule()
    assert len(plan) == batch and all(s.start >= context - batch for s in plan), "not a decode step"

    def schedule(_):
        for s in engine._schedule():
            engine._reserve(s.req, s.end)

    rows = {"schedule": median_ms(schedule, repeat), "batch": median_ms(lambda _: engine._batch(plan), repeat)}
    step_batch = engine._batch(plan)
    for name, build in plan_builders(engine, engine.cache).items():
        # a fresh Batch each time (untimed): a batch caches its plans (built once per step); a plan that a step
        # builds after others it reads has those built first, untimed
        build, before = build if isinstance(build, tuple) else (build, lambda b: b)
        rows[name] = median_ms(build, repeat, lambda before=before: before(dataclasses.replace(step_batch)))
    hca_plan = opt_model._index_plan(step_batch, args.window_size, 128, None)
    if not step_batch.builds_on_host(opt_model._hca_walk(step_batch, hca_plan)):
        rows["HCA lists (device build)"] = rows.pop("HCA lists")
    host = sum(v for k, v in rows.items() if "device build" not in k)
    return {"batch": batch, "context": context, "ms": rows, "host_ms": host}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    p.add_argument("--context", nargs="+", type=int, default=[4096, 65536])
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    # each request of a batch is a token shorter than the one before it: the shortest needs one position
    if min(a.batch) < 1 or a.repeat < 1 or min(a.context) < max(a.batch):
        p.error(f"--batch, --repeat: at least 1; --context: at least the largest batch ({max(a.batch)})")
    torch.set_num_threads(1)  # the host thread of a decode step
    results = []
    with tempfile.TemporaryDirectory() as d:
        args = ModelArgs.tiny(max_seq_len=max(a.context) + 64)
        ckpt = write_checkpoint(d, args, seed=0)
        for context in a.context:
            for batch in a.batch:
                results.append(r := measure(args, ckpt, batch, context, a.repeat))
                print(f"batch {batch}, context {context}: host {r['host_ms']:.3f} ms a step (device builds apart)")
                for name, ms in r["ms"].items():
                    print(f"  {name:32s} {ms:8.3f} ms")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

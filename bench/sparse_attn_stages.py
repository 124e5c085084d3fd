"""sparse_attn decode at each batch size with 1 / 2 / 3 pipeline stages (and 4 warps): graph-replay us per call and
whether the outputs are bitwise equal to the default configuration's. Flash CSA, ctx 64k, K 640, 64 heads, d 512,
T 1, 16, 64, 256, the KV pool 1 GiB (beyond L2). The op's configuration is fixed per (heads, head dim) so that a
row's bits never depend on its batch; stages only pipeline the loads, so a per-batch-size choice of them would be
allowed if it paid (session 13, H100: it does not; docs/perf.md, thirteenth pass). Needs a CUDA device:

    PYTHONPATH=. python3 bench/sparse_attn_stages.py
"""

import functools

import torch

from bench.cuda_graph import captured
from parity.optimized.ops import OpsConfig, resolve_ops

if not torch.cuda.is_available():
    raise SystemExit("sparse_attn_stages: needs a CUDA device")
resolve_ops(OpsConfig(overrides=(("sparse_attn", "triton"),)))
from parity.optimized.ops.triton import sparse_attn as k  # noqa: E402

dev, d, h, window, n_ent = "cuda", 512, 64, 128, 512
pool = torch.randn(1 << 20, d, dtype=torch.bfloat16, device=dev)
sink = torch.randn(h, device=dev)
g = torch.Generator().manual_seed(0)


def bench(fn, reps=20):
    graph = captured([fn], 20)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / 20)
    return sorted(times)[len(times) // 2]


for t in (1, 16, 64, 256):
    chunk = torch.randn(t, d, dtype=torch.bfloat16, device=dev)
    ring = torch.randn(t * window, d, dtype=torch.bfloat16, device=dev)
    ring_idx = t + torch.arange(t, device=dev)[:, None] * window + torch.arange(window - 1, device=dev)
    ent = torch.randint(0, pool.shape[0], (t, n_ent), generator=g).to(dev)
    idx = torch.cat([ring_idx, torch.arange(t, device=dev)[:, None], t + t * window + ent], dim=1)
    q = torch.randn(t, h, d, dtype=torch.bfloat16, device=dev)
    base = None
    for cfg in ((64, 8, 1, 1), (64, 8, 2, 1), (64, 8, 3, 1), (64, 4, 1, 1)):
        fn = functools.partial(k.sparse_attn, q, (chunk, ring, pool), idx, sink, d**-0.5, config=cfg)
        try:
            out = fn()
        except Exception as e:
            print(f"T {t} cfg {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        base = out if base is None else base
        same = torch.equal(out.view(torch.int16), base.view(torch.int16))
        print(f"T {t} cfg {cfg}: {bench(fn):.1f} us, bits equal to stages 1: {same}", flush=True)

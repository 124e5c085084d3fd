"""sparse_attn decode at each batch size with 1 / 2 / 3 pipeline stages (and 4 warps): graph-replay us per call and
whether the outputs are bitwise equal to the default configuration's. Flash CSA, ctx 64k, K 640, 64 heads, d 512
(`bench/ncu_ops.py`'s case), T 1, 16, 64, 256. The op's configuration is fixed per (heads, head dim) so that a
row's bits never depend on its batch; stages only pipeline the loads, so a per-batch-size choice of them would be
allowed if it paid (session 13, H100: it does not; docs/perf.md, thirteenth pass). Needs a CUDA device:

    PYTHONPATH=. python3 bench/sparse_attn_stages.py
"""

import functools

import torch

from bench.ncu_ops import sparse_attn_args
from bench.triton_gemm import graph_ms
from parity.optimized.ops import OpsConfig, resolve_ops

if not torch.cuda.is_available():
    raise SystemExit("sparse_attn_stages: needs a CUDA device")
resolve_ops(OpsConfig(overrides=(("sparse_attn", "triton"),)))
from parity.optimized.ops.triton import sparse_attn as k  # noqa: E402

for t in (1, 16, 64, 256):
    args = sparse_attn_args(t)
    base = None
    for cfg in ((64, 8, 1, 1), (64, 8, 2, 1), (64, 8, 3, 1), (64, 4, 1, 1)):
        fn = functools.partial(k.sparse_attn, *args, config=cfg)
        try:
            out = fn()
        except Exception as e:
            print(f"T {t} cfg {cfg}: {type(e).__name__} {str(e)[:100]}", flush=True)
            continue
        base = out if base is None else base
        same = torch.equal(out.view(torch.int16), base.view(torch.int16))
        us = graph_ms([fn], launches=20) * 1000
        print(f"T {t} cfg {cfg}: {us:.1f} us, bits equal to stages 1: {same}", flush=True)

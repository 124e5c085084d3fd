"""The host's work in a decode step's attention middles does not grow with the batch: the aten calls that run a
kernel (views and allocations left out) and the Triton launches of every layer's `OptAttention.requests` are the same
for 2 requests as for 6 (the Triton backend: one launch per op for the whole batch; the torch backend runs its
shape-sensitive ops per request by design).

Counted in a subprocess that runs the Triton wrappers' GPU code paths on CPU tensors with every Triton launch
stubbed out (`TRITON_INTERPRET=0`, which a process must choose before importing triton): the counts are what the
host issues on a GPU, independent of the machine. The decode step measured has requests completing CSA blocks in
both batches (positions 55 + i), so the compressor's block path runs in both. A planted per-request loop (the
compressor state machine called once per request) must fail the comparison.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import collections, json, os, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
import torch
import triton.runtime.autotuner as at
import triton.runtime.jit as jit
from torch.utils._python_dispatch import TorchDispatchMode

launches = collections.Counter()
def stub(self, *args, **kwargs):
    launches["n"] += 1
jit.JITFunction.run = stub
at.Autotuner.run = stub
from parity.optimized.ops.triton import runtime
runtime.setup = lambda: "cuda"
from parity.checkpoint import build_model, write_checkpoint
from parity.config import ModelArgs
from parity.optimized import model as opt_model
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.ops import OpsConfig, resolve_ops

NOT_KERNELS = {"zeros", "empty", "lift_fresh"}  # allocations (torch.empty is patched to zeros below)
class Count(TorchDispatchMode):
    # the aten calls that run a kernel on a GPU: views (whose number varies with shapes) and allocations left out
    def __init__(self):
        super().__init__()
        self.n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NOT_KERNELS:
            self.n += 1
        return func(*args, **(kwargs or {}))

if os.environ.get("PLANT") == "per-request":
    step, decode = opt_model.OptCompressor.decode_step, opt_model.OptCompressor.decode
    def looped(self, kv, score, s, state, *rest):
        # the state machine's writes made once per request (what the batched op replaced), then the batch's
        for i in range(s.phase.shape[0]):
            rows = s.rows[i : i + 1] if s.rows is not None else torch.tensor([i])
            step(self, kv, score, opt_model._DecodeStep(rows, s.phase[i : i + 1], s.slots[i : i + 1], None), state)
        return decode(self, kv, score, s, state, *rest)
    opt_model.OptCompressor.decode = looped

torch.set_num_threads(1)
args = ModelArgs.tiny()
with tempfile.TemporaryDirectory() as d:
    ckpt = write_checkpoint(d, args, seed=0)
    ops = resolve_ops(OpsConfig(default="triton"))
    model, _ = build_model(ckpt, device=torch.device("cpu"), factory=lambda a: opt_model.OptimizedTransformer(a, ops))
zeros = torch.zeros
torch.empty = lambda *a, **k: zeros(*a, **k)  # stubbed kernels write nothing: keep the buffers defined
counts, measuring, requests = {}, [False], opt_model.OptAttention.requests
def counted(self, a, batch, cache):
    if not measuring[0]:
        return requests(self, a, batch, cache)
    launches.clear()
    with Count() as c:
        o = requests(self, a, batch, cache)
    counts[self.layer_id] = [c.n, launches["n"]]
    return o
opt_model.OptAttention.requests = counted
bs = int(sys.argv[1])
engine = Engine(model, EngineConfig(max_requests=bs, chunk_size=512, token_budget=4096))
g = torch.Generator().manual_seed(0)
for i in range(bs):
    engine.add_request(torch.randint(0, args.vocab_size, (52 + i,), generator=g), 8)
for _ in range(3):  # the prefill, then decodes up to positions 54 + i
    engine.step()
measuring[0] = True
engine.step()  # positions 55 + i: 55 and 59 complete CSA blocks
print(json.dumps(counts))
"""


def host_work(batch: int, plant: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PLANT": plant, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(batch)], capture_output=True, text=True, env=env, cwd=REPO, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_attention_middles_do_the_same_host_work_for_2_and_6_requests():
    two, six = host_work(2), host_work(6)
    assert two.keys() == six.keys() and len(two) >= 4
    assert two == six, f"per-layer (aten calls, Triton launches): 2 requests {two}, 6 requests {six}"


def test_a_planted_per_request_loop_is_caught():
    assert host_work(2, "per-request") != host_work(6, "per-request")

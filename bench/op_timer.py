"""Per-op and per-layer time of one engine step, and the bytes that step must read (`layer_speed.py --breakdown`).

`StepProbe(model, time_ops=...)` swaps the model's `Ops` for a copy whose every op is wrapped (restored on exit) and
hooks each layer's forward. On CUDA each call / layer is bracketed by two events on the current stream, all read
after one synchronize, so the probe adds event records but no host waits; on CPU (no events) `time.perf_counter`
brackets the call, which is exact there because CPU ops finish before they return. The wrappers also keep what the
bytes model needs: the expert ids each layer routed to, the KV rows sparse attention gathered, the indexer entries.
"""

import statistics
import time
from collections import defaultdict
from dataclasses import replace

import torch

from parity.optimized.ops import OP_MODULES

OUTSIDE = "outside layers"  # the scope of ops outside the blocks (the head's hc_head and norm)


class _Clock:
    """Start/stop marks: CUDA events on the current stream, or host time where ops run synchronously."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ms(self, start, stop) -> float:
        return start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepProbe:
    """Context manager around one engine step. `time_ops=False` times the layers only (two events per layer), the
    clean per-layer time; `time_ops=True` also times every op call (the breakdown), which adds host work per call.
    Read `summary()` after the step (it synchronizes)."""

    def __init__(self, model, time_ops: bool = True):
        self.model, self.time_ops = model, time_ops
        self.device = next(model.parameters()).device
        self.clock = _Clock(self.device.type == "cuda")
        self.calls = []  # (op, scope, start, stop)
        self.layer_marks = {}  # layer index -> [start, stop]
        self.scope = OUTSIDE
        self.depth = 0  # an op that calls another registered op is timed once, as the outer call
        self.routed = defaultdict(list)  # scope -> expert id tensors
        self.kv_idx = defaultdict(list)  # scope -> (idx, bytes per row)
        self.index_bytes = defaultdict(int)  # scope -> indexer entry bytes scored

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            self._capture(name, args)
            if not self.time_ops or self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            try:
                start, host = self.clock.mark(), time.perf_counter()
                out = fn(*args, **kwargs)
                host = time.perf_counter() - host  # the host's own time in the call: its Python and launches
                self.calls.append((name, self.scope, start, self.clock.mark(), host))
            finally:
                self.depth -= 1
            return out

        return timed

    def _capture(self, name, args):
        # references only: reduced after the step so that nothing here waits on the device
        if name == "moe_experts":
            self.routed[self.scope].append(args[2])
        elif name == "sparse_attn":
            ring = args[1][1]
            self.kv_idx[self.scope].append((args[2], ring.shape[-1] * ring.element_size()))
        elif name == "indexer_topk":
            self.index_bytes[self.scope] += args[1].numel() * args[1].element_size()
        elif name == "indexer_topk_ragged":  # the entries it reads: one pool row per entry row id
            pool, entry_rows = args[1], args[2]
            self.index_bytes[self.scope] += entry_rows.numel() * pool.shape[-1] * pool.element_size()

    def _enter_layer(self, i):
        def hook(module, args):
            self.scope = i
            self.layer_marks[i] = [self.clock.mark(), None]

        return hook

    def _leave_layer(self, module, args, out):
        self.layer_marks[self.scope][1] = self.clock.mark()
        self.scope = OUTSIDE

    def __enter__(self):
        ops = self.model.ops
        self.original = ops
        wrapped = replace(ops, **{name: self._wrap(name, getattr(ops, name)) for name in OP_MODULES})
        # every module that calls ops holds the model's one Ops object (OptimizedTransformer passes it down)
        self.holders = [m for m in self.model.modules() if getattr(m, "ops", None) is ops]
        for m in self.holders:
            m.ops = wrapped
        self.hooks = []
        for i, layer in enumerate(self.model.layers):
            self.hooks.append(layer.register_forward_pre_hook(self._enter_layer(i)))
            self.hooks.append(layer.register_forward_hook(self._leave_layer))
        return self

    def __exit__(self, *exc):
        for m in self.holders:
            m.ops = self.original
        for h in self.hooks:
            h.remove()
        return False

    def summary(self) -> dict:
        """Per op (calls, ms between the call's events, host_ms the host spent in the call), per layer (layer ms, ms
        inside ops, experts routed to, KV / indexer bytes read)."""
        sync(self.device)
        ops = defaultdict(lambda: {"calls": 0, "ms": 0.0, "host_ms": 0.0})
        op_ms_in = defaultdict(float)
        for name, scope, start, stop, host in self.calls:
            ms = self.clock.ms(start, stop)
            ops[name]["calls"] += 1
            ops[name]["ms"] += ms
            ops[name]["host_ms"] += host * 1e3
            op_ms_in[scope] += ms
        layers = {}
        for i, (start, stop) in self.layer_marks.items():
            kv = sum(torch.unique(idx[idx >= 0]).numel() * row for idx, row in self.kv_idx[i])
            experts = torch.unique(torch.cat([t.flatten() for t in self.routed[i]])) if self.routed[i] else None
            layers[i] = {
                "ms": self.clock.ms(start, stop),
                "op_ms": op_ms_in[i],
                "experts_touched": None if experts is None else int((experts >= 0).sum()),
                "kv_bytes": int(kv),
                "indexer_bytes": self.index_bytes[i],
            }
        return {"ops": dict(ops), "op_ms_outside_layers": op_ms_in[OUTSIDE], "layers": layers}


def copy_rate(device: torch.device, nbytes: int, repeat: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of `repeat` after one warm-up."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock = _Clock(device.type == "cuda")
    dst.copy_(src)
    marks = []
    for _ in range(repeat):
        start = clock.mark()
        dst.copy_(src)
        marks.append((start, clock.mark()))
    sync(device)
    ms = statistics.median(clock.ms(a, b) for a, b in marks)
    return 2 * nbytes / (ms * 1e-3)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # packed FP4 pairs are one element of one byte


def layer_weight_bytes(model, i: int) -> dict:
    """Stored bytes of layer i's parameters: the dense part (read whole by any step), one routed expert, and the
    per-token tables (hash routing `tid2eid`: rows only, left out)."""
    prefix = f"layers.{i}."
    dense, experts = 0, defaultdict(int)
    for name, p in model.named_parameters():
        if not name.startswith(prefix) or name.endswith("gate.tid2eid"):
            continue
        rest = name[len(prefix) :]
        if rest.startswith("ffn.experts."):
            experts[int(rest.split(".")[2])] += _nbytes(p)
        else:
            dense += _nbytes(p)
    return {"dense": dense, "per_expert": max(experts.values(), default=0), "n_experts": len(experts)}


def bytes_model(model, summary: dict, n_tokens: int) -> dict:
    """Bytes one step must read per layer: dense weights + routed experts touched + KV rows + indexer entries."""
    args = model.args
    out = {}
    for i, lay in summary["layers"].items():
        w = layer_weight_bytes(model, i)
        touched = lay["experts_touched"]
        if touched is None:  # no routing captured: every token's top-k on distinct experts
            touched = min(w["n_experts"], n_tokens * args.n_activated_experts)
        expert_bytes = touched * w["per_expert"]
        total = w["dense"] + expert_bytes + lay["kv_bytes"] + lay["indexer_bytes"]
        kv = {"kv_bytes": lay["kv_bytes"], "indexer_bytes": lay["indexer_bytes"]}
        out[i] = dict(w, experts_touched=touched, expert_bytes=expert_bytes, **kv, total=total)
    return out


ASSUMPTIONS = (
    "bytes a step must read, per layer: every parameter of the layer once in its stored dtype (FP8 weights 1 B/elem "
    "+ e8m0 scales, FP4 experts 0.5 B/elem + one scale byte per 32, bf16/fp32 as stored; the Triton o_lora reads "
    "an FP8 copy of the bf16 wo_a, counted as bf16 here)",
    "routed experts: only the distinct experts the step's routing selected (captured from moe_experts' ids), each "
    "read once whatever its token count; the hash-routing table tid2eid and the rope table are read by rows: left out",
    "KV: the distinct rows the layer's sparse_attn gathers (window ring, this step's KV, compressed entries), one "
    "row = head_dim x the cache dtype (bf16); the CSA indexer: all its compressed entries, per request",
    "not counted: activations (hc streams, q, the MoE dispatch), the compressor state rows (fp32, one row per "
    "token, whole ring only at a block boundary), the cache writes",
    "roofline rate: the measured device-to-device copy (read + write bytes / time); % roofline = (bytes / rate) / "
    "layer ms, layer ms from the layer-only timed step (events around each block's forward, glue included)",
)


# ---- what a step costs the host (`layer_speed.py --breakdown`) -----------------------------------------------------
# Step medians of this host-bound engine moved up to 2x between H200 hosts of one session; these counts do not
# depend on the host: the GPU's kernel time, the kernels the host launched, and the times it waited for the GPU.

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch",)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def host_profile(run_step, device: torch.device) -> dict:
    """One step under torch.profiler: its wall ms, the summed GPU kernel ms, the kernel launches and the host waits
    (explicit synchronizations; a blocking device-to-host copy waits inside cudaMemcpyAsync and is counted apart)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        wall = run_step()
    events = prof.key_averages()
    count = {e.key: e.count for e in events}
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    return dict(
        wall_ms=wall,
        gpu_kernel_ms=sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e3,  # CPU: 0
        launches=sum(count.get(k, 0) for k in LAUNCHES),
        syncs=sum(count.get(k, 0) for k in SYNCS),
        device_to_host_copies=count.get("Memcpy DtoH (Device -> Pageable)", 0)
        + count.get("Memcpy DtoH (Device -> Pinned)", 0),
        aten_calls=sum(e.count for e in events if e.key.startswith("aten::")),  # nested calls included
        graph_launches=sum(count.get(k, 0) for k in GRAPH_LAUNCHES),
        # where the GPU's time goes: the kernels with the most of it (name, runs, ms), graph-replayed ones included
        top_kernels=[(e.key[:90], e.count, e.self_device_time_total / 1e3) for e in gpu[:15]],
    )

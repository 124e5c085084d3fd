"""Tensor parallelism for the optimized model: the rank context, the official V4 sharding rules, and the
collectives where the official `model.py` has them (spec §3.1, §4.1, §4.6, §5.6, §7.2, §9.3; docs/optimized.md).

The official layout at world size W, restated:
- embedding and head: the vocabulary is cut into W contiguous row slices. A rank looks up only the ids of its
  slice (others read zeros) and the lookups are all-reduced, a sum with zeros, so exact; the head computes the
  logits of its slice and they are all-gathered and concatenated.
- attention: the query heads are split (wq_b rows, attn_sink) and with them the output groups (wo_a rows);
  wo_b is split along its input (columns), each rank's bf16 GEMM output is all-reduced in fp32 and cast back to
  bf16. wq_a, wkv, the norms and the compressors are replicated (one MQA KV head).
- indexer: its heads are split (wq_b rows, weights_proj rows); each rank sums its heads' weighted scores in bf16
  and the sums are all-reduced in bf16 before the top-k. The weight scale keeps the global head count.
- MoE: the gate and the shared expert are replicated; routed experts are split into W contiguous id ranges. A rank
  accumulates its own experts in fp32 (ascending id), the partial sums are all-reduced in fp32, then the shared
  expert is added and the sum cast to bf16.

What changes numerically against one rank (so a TP run is compared within a tolerance, docs/optimized.md): wo_b's
partial products are rounded to bf16 before they are added, and the indexer's per-rank head sums are rounded to
bf16 before the all-reduce. Everything else is per-row or per-head math on the same operands, or the MoE's fp32
sum of disjoint expert sets.

Backends: `gloo` on CPU (tested in CI, 2 processes), `nccl` on CUDA (issue #16; run it with NCCL_NVLS_ENABLE=0:
NVLink multicast stays off on the lent machines). The NCCL path is not exercised on this CPU-only machine.
"""

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parity.errors import ParityError

BACKENDS = ("gloo", "nccl")

# (parameter name pattern, dim): the tensors the official convert.py cuts into W slices (its `mapping` table, keys
# embed/head/wq_b/wo_a/attn_sink/weights_proj on dim 0 and wo_b on dim 1, scales with their weight). Everything
# else is replicated, and routed experts are split by expert id instead.
SPLIT = tuple(
    (re.compile(p), d)
    for p, d in (
        (r"(^|\.)embed\.weight$", 0),
        (r"(^|\.)head\.weight$", 0),
        (r"\.attn\.wq_b\.(weight|scale)$", 0),
        (r"\.attn\.attn_sink$", 0),
        (r"\.attn\.wo_a\.weight$", 0),
        (r"\.attn\.wo_b\.(weight|scale)$", 1),
        (r"\.indexer\.wq_b\.(weight|scale)$", 0),
        (r"\.indexer\.weights_proj\.weight$", 0),
    )
)

# the dump's merge rule of a module's records: a rule for all its fields, or a dict field -> rule; "replicated",
# "sum" (partial sums before an all-reduce) or "cat:<dim>". The attribute `parity.dump` reads (its
# `format.MERGE_ATTR`, spelled here too: the models never import the dump layer)
MERGE_ATTR = "parity_merge"


def split_dim(name: str) -> int | None:
    """The dim along which parameter `name` is cut into rank slices, or None (replicated or an expert)."""
    return next((d for p, d in SPLIT if p.search(name)), None)


@dataclass(frozen=True)
class TP:
    """One rank's view: `rank` of `world` ranks in the default process group. `TP()` is one rank (no collective).

    `offset` plants a bug for the harness's own tests, never set in a real run: `(rank, name regex, rows)` makes
    that rank read the slices of the matching parameters `rows` rows (along the split dim) past where they start.
    """

    rank: int = 0
    world: int = 1
    offset: tuple[int, str, int] | None = None

    @classmethod
    def current(cls) -> "TP":
        """The context `use()` set in this process, else the default process group's rank and size, else one rank."""
        if _DEFAULT is not None:
            return _DEFAULT
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def local(self, n: int, what: str) -> int:
        """n // world, refusing a size the ranks cannot split evenly (as convert.py asserts)."""
        if n % self.world:
            raise ParityError(f"tensor parallel: {what} is {n}, not divisible by the world size {self.world}")
        return n // self.world

    # the checkpoint reader's hook (`parity.checkpoint.reader.load_params`): read the whole tensor, keep a slice
    def full_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        dim = split_dim(name)
        if dim is None or self.world == 1:
            return shape
        return (*shape[:dim], shape[dim] * self.world, *shape[dim + 1 :])

    def narrow(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of parameter `name` (the whole tensor when it is replicated)."""
        dim = split_dim(name)
        if dim is None or self.world == 1:
            return full
        size = self.local(full.shape[dim], f"{name} dim {dim}")
        start = self.rank * size
        if self.offset is not None and self.offset[0] == self.rank and re.search(self.offset[1], name):
            start += self.offset[2]
            if not 0 <= start <= full.shape[dim] - size:
                raise ParityError(f"TP.offset {self.offset}: {name} slice start {start} is outside the tensor")
        return full.narrow(dim, start, size)

    def experts(self, n: int) -> range:
        """The routed expert ids this rank holds."""
        size = self.local(n, "n_routed_experts")
        return range(self.rank * size, (self.rank + 1) * size)

    # collectives: every rank calls them in the same order (the engine's schedule is the same on every rank)
    def all_reduce(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The sum over ranks, computed in `dtype` (default: x's) and returned in x's dtype."""
        if self.world == 1:
            return x
        y = x.to(dtype or x.dtype).contiguous()
        dist.all_reduce(y)
        return y.to(x.dtype)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x, concatenated along `dim` in rank order."""
        if self.world == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


ONE_RANK = TP()  # no tensor parallelism: every collective is the identity
_DEFAULT: TP | None = None


def use(tp: TP | None) -> None:
    """Make `tp` this process's context (what models built without an explicit one take; None: back to the
    process group's). A TP process holds one rank, like the official code's module globals."""
    global _DEFAULT
    _DEFAULT = tp


def declare(module: nn.Module, rule: str | dict[str, str]) -> None:
    """How the ranks' records of `module` merge into one logical tensor (read by `parity.dump`)."""
    setattr(module, MERGE_ATTR, rule)


def shard(model: nn.Module, tp: TP) -> None:
    """Cut a model built with whole tensors down to rank `tp.rank`'s parameters (also on the meta device, where it
    costs nothing): split parameters narrowed to their slice, routed experts of other ranks removed (None)."""
    if tp.world == 1:
        return
    modules = dict(model.named_modules())
    for name, p in list(model.named_parameters()):
        dim = split_dim(name)
        if dim is None:  # replicated, or a routed expert (removed below when another rank holds it)
            continue
        owner, _, leaf = name.rpartition(".")
        part = tp.narrow(name, p.data).clone()
        setattr(modules[owner], leaf, nn.Parameter(part, requires_grad=p.requires_grad))
        merge = dict(getattr(modules[owner], MERGE_ATTR, None) or {})
        declare(modules[owner], {**merge, leaf: f"cat:{dim}"})
    for m in model.modules():
        experts = getattr(m, "experts", None)
        if isinstance(experts, nn.ModuleList) and hasattr(m, "gate"):
            mine = tp.experts(len(experts))
            for i in range(len(experts)):
                if i not in mine:
                    experts[i] = None


# the sharded forward pieces
def embed(tokens: torch.Tensor, weight: torch.Tensor, tp: TP) -> torch.Tensor:
    """ParallelEmbedding: ids outside this rank's vocab slice read zeros, then the ranks' rows are summed."""
    if tp.world == 1:
        return F.embedding(tokens, weight)
    start = tp.rank * weight.shape[0]
    outside = (tokens < start) | (tokens >= start + weight.shape[0])
    h = F.embedding(torch.where(outside, 0, tokens - start), weight)
    h[outside] = 0
    return tp.all_reduce(h)


def row_parallel(y: torch.Tensor, tp: TP) -> torch.Tensor:
    """RowParallelLinear's output: the ranks' partial GEMM outputs summed in fp32, cast back (spec §3.1)."""
    return tp.all_reduce(y, torch.float32)


def indexer_topk(q, entries, weights, k: int, start_pos: int, ratio: int, tp: TP) -> torch.Tensor:
    """`ops.indexer_topk` with this rank's heads: the weighted head sums of all ranks are all-reduced (bf16, spec
    §7.2 step 8) before the mask and the top-k. Shapes and order as `ops.indexer_topk.indexer_topk_torch`."""
    from parity.optimized.ops.indexer_topk import _scores
    from parity.reference.model import causal_entry_mask

    seqlen = q.shape[0]
    if start_pos == 0:
        score = tp.all_reduce(_scores(q, entries, weights))
        mask = causal_entry_mask(seqlen, ratio, q.device)
        score += torch.where(mask, float("-inf"), 0.0).to(score.dtype)
        topk = score.topk(k, dim=-1)[1][0]
        limit = torch.arange(1, seqlen + 1, device=q.device).unsqueeze(1) // ratio
        return torch.where(topk >= limit, -1, topk)
    # each token over its visible entries alone, as the reference decode; one all-reduce for all of them
    visible = [(start_pos + r + 1) // ratio for r in range(seqlen)]
    rows = [_scores(q[r : r + 1], entries[:v], weights[r : r + 1])[0, 0] for r, v in enumerate(visible)]
    summed = tp.all_reduce(torch.cat(rows)).split(visible)
    out = torch.full((seqlen, k), -1, dtype=torch.int64, device=q.device)
    for r, score in enumerate(summed):
        kr = min(k, visible[r])
        out[r, :kr] = score.topk(kr, dim=-1)[1]
    return out


def moe(x, weights, indices, experts: dict, shared, scale_fmt, scale_dtype, tp: TP) -> torch.Tensor:
    """MoE.forward with this rank's experts (`experts`: id -> ExpertWeights): fp32 partial sums in ascending expert
    id, all-reduced in fp32, then the shared expert, then bf16 (spec §9.3). The torch expert path: a grouped
    backend kernel fuses the shared expert and the bf16 cast, which the all-reduce has to sit between."""
    from parity.optimized.ops.moe_experts import expert_forward

    y = torch.zeros_like(x, dtype=torch.float32)
    flat = indices.flatten().long()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens ascending
    counts = torch.bincount(flat, minlength=max(experts, default=0) + 1).tolist()
    starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
    k = indices.shape[1]
    for e in sorted(experts):
        if e >= len(counts) or counts[e] == 0:
            continue
        pairs = order[starts[e] : starts[e] + counts[e]]
        rows, slot = pairs // k, pairs % k
        y[rows] += expert_forward(experts[e], x[rows], weights[rows, slot, None], scale_fmt, scale_dtype)
    y = tp.all_reduce(y)
    y += expert_forward(shared, x, None, scale_fmt, scale_dtype)
    return y.type_as(x)


# processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, backend: str, port: int, device: str = "cpu") -> TP:
    """Join the default process group on 127.0.0.1:`port` as `rank` of `world`; returns the rank's context."""
    if backend not in BACKENDS:
        raise ParityError(f"tensor parallel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "nccl":
        # NVLink multicast (NVLS) stays off on the lent GPUs (issue #16); set before NCCL initializes
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        torch.cuda.set_device(torch.device(device).index or rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return TP(rank, world)


def check_backend(backend: str, device: str) -> None:
    """`gloo` runs on CPU tensors, `nccl` on CUDA ones: refuse a mismatch before any process starts."""
    want = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend not in BACKENDS:
        raise ParityError(f"tensor parallel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend != want:
        raise ParityError(f"tensor parallel backend {backend!r} on device {device!r}: use {want!r} there")


def spawn(fn: Callable, world: int, backend: str, *args, device: str = "cpu") -> None:
    """Run `fn(tp, *args)` in `world` fresh processes, one rank each, in one process group; raises if any fails.
    `fn` must be importable by name (a module-level function): the processes are started with `spawn`."""
    import torch.multiprocessing as mp

    check_backend(backend, device)
    if world < 1:
        raise ParityError(f"tensor parallel world size {world}: expected >= 1")
    mp.spawn(_worker, args=(fn, world, backend, free_port(), device, args), nprocs=world, join=True)


def _worker(rank: int, fn: Callable, world: int, backend: str, port: int, device: str, args: tuple) -> None:
    tp = init(rank, world, backend, port, f"cuda:{rank}" if device.startswith("cuda") else device)
    try:
        fn(tp, *args)
    finally:
        dist.destroy_process_group()

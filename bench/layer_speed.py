"""Whole-step time of the optimized engine per backend on a Flash-shaped model (one CUDA GPU).

    PYTHONPATH=. python3 bench/layer_speed.py --out DIR [--backends torch triton] [--prefill [512 2048]]
                                              [--decode [1 8 64]] [--repeat 5] [--breakdown] [--layers 2] [--graphs]
                                              [--mtp] [--overlap [--pyprofile]] [--context N] [--smoke]

The model is `bench/gpu_checks.py flash`'s: V4-Flash widths (dim 4096, 64 heads of 512, q-LoRA 1024, o-LoRA 8 x 1024,
indexer 64 x 128, top-k 512, expert 2048, window 128) with 16 routed experts (of 256) and two layers, one CSA
(compress ratio 4) and one HCA (128), or `--layers N` alternating them; the engine drafts no MTP tokens but in
`--mtp`'s rows (one draft per step: each step verifies [token, draft], replays rejected ones, drafts). Each
number is one engine step (`Engine.step`: scheduling, the forward of every layer, the head, the commit),
CUDA-synchronized, median of
`--repeat` after one warm-up step that compiles the Triton kernels:
- prefill T: one request of T prompt tokens in one chunk (a fresh engine per repeat);
- decode B: B requests of 64 prompt tokens, prefilled, then one-token decode steps with all B in the batch;
  with `--context N`, the B requests are placed after N positions each without a prefill (`bench/placed.py`: blocks
  reserved, the cache's rings, pools and compressor states random), so the steps read N-long contexts (the KV
  gathered, the indexer's scores over N / 4 entries, the block tables and index lists of N positions).
"Per layer" is the step divided by the two layers, an upper bound (the step also embeds, runs the head and
schedules). The ops of a backend come from `OpsConfig(default=backend)`; ops a backend does not register fall back
to torch (listed in the output). `--prefill` / `--decode` with no sizes skip that phase. Writes layer_speed.json and
layer_speed.md to --out.

`--breakdown` adds, per size, two more steps that the medians do not include (`bench/op_timer.py`): one with
CUDA events around each layer's forward (the per-layer time), then one with events around every call of every op
of the model's `Ops` too: per op calls, GPU ms (between the call's events) and share of that step's wall, host ms
(the host's own time inside the calls: where GPU ms is about host ms, the GPU waited on the host's launches), and
the rest ("outside ops": host scheduling, Python, the torch glue between the ops). With the bytes each layer must
read (weights as stored, the routed experts the step selected, the KV rows gathered) and the measured device copy
rate, each layer gets a "% of HBM roofline"; the assumptions are written into the markdown.

The breakdown ends with one step under torch.profiler: its GPU kernel time, kernel launches, host synchronizations
and device-to-host copies. Whole-step times of this host-bound engine moved up to 2x between the H200 hosts of one
session; these counts do not depend on the host.

`--graphs` adds the decode sizes again with `EngineConfig(graphs=True)`: each layer's per-token work replayed from
CUDA graphs, the per-request middle of the attention eager (`parity.optimized.graphs`); with `--breakdown`, such a
row reports the bytes its layers read (from one eager step), its % of the roofline over the whole step, one graphed
step under the profiler (the per-op timers cannot see inside a graph), and one more with the host's own time split
into the attention middles, the piece replays, the head and the rest.

`--overlap` adds the decode sizes again with `EngineConfig(overlap=True)` (and graphs with `--graphs`): the next
step is issued before the host reads this step's tokens, so the steps run back to back with no synchronization
between them; each such row's step time is the period between the host's step starts (with `--breakdown`, only the
bytes its layers read and its share of the roofline over the whole step). `--pyprofile` runs three more such steps
under cProfile and writes the host's functions by own and by cumulative time (`pyprofile_overlap_B.txt`).

`--smoke` runs the same code on CPU on `ModelArgs.tiny()` with the torch backend (decode 2, prefill 16, repeat 1
unless given), timing with `time.perf_counter`: a check of the code path, not a measurement.
"""

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bench.op_timer import ASSUMPTIONS, StepProbe, bytes_model, copy_rate, host_profile, sync
from bench.placed import place_decoding
from parity.checkpoint import build_model, write_checkpoint
from parity.config import ModelArgs
from parity.optimized.cache import PagedCache
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.model import OptimizedTransformer
from parity.optimized.ops import OpsConfig, resolve_ops

PROMPT_FOR_DECODE = 64


def flash_shaped(layers: int = 2, context: int = 0) -> ModelArgs:
    """V4-Flash widths, 16 routed experts, `layers` layers alternating CSA (4) and HCA (128), the first hash-routed.
    The MTP layer is in the checkpoint (as in gpu_checks.py); the engine drafts only in `--mtp`'s rows. `context`:
    the longest decode context, which max_seq_len must hold (its RoPE table)."""
    ratios = tuple(4 if i % 2 == 0 else 128 for i in range(layers)) + (0,)
    longest = {"max_seq_len": max(ModelArgs.flash().max_seq_len, context + 1024)}
    return ModelArgs.flash(
        n_layers=layers, n_hash_layers=1, n_routed_experts=16, vocab_size=16384, compress_ratios=ratios, **longest
    )


def timed_step(engine: Engine, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    engine.step()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


def untimed_wall(fn) -> float:
    """Host wall ms of `fn()`, the device not waited for."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def prefill_engine(model, tokens: int, gen: torch.Generator) -> Engine:
    config = EngineConfig(max_requests=1, num_blocks=tokens // 16 + 8, chunk_size=tokens, token_budget=tokens)
    engine = Engine(model, config)
    engine.add_request(torch.randint(0, model.args.vocab_size, (tokens,), generator=gen), 1)
    return engine


def prefill_ms(model, tokens: int, repeat: int, gen: torch.Generator, device, rate=None):
    times = []
    for i in range(repeat + 1):
        t = timed_step(prefill_engine(model, tokens, gen), device)
        if i:  # the first one compiles
            times.append(t)
    if rate is None:
        return times, None
    own = torch.Generator().manual_seed(tokens)  # leaves `gen` (the next sizes' prompts) as without --breakdown
    return times, breakdown(model, lambda: prefill_engine(model, tokens, own), tokens, device, rate)


def python_profile(run_steps, path: Path) -> None:
    """Steps under cProfile (after the timed ones): the host functions by own time and by cumulative time, written
    to `path`. cProfile slows Python-heavy code, so the shares say where the host's time goes, not its size."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(run_steps)
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(key).print_stats(45)
    path.write_text(text.getvalue())


def decode_ms(
    model, batch: int, repeat: int, gen: torch.Generator, device, rate=None, graphs: bool = False, mtp: bool = False,
    context: int = 0, overlap: bool = False, pyprofile: Path | None = None,
):  # fmt: skip
    """Decode steps of `batch` requests after a 64-token prompt each, or, with `context`, placed after that many
    positions without a prefill (`bench/placed.py`: random cache contents). `mtp`: one MTP draft per step, so a step
    verifies [token, draft] per request, replays the committed token where the draft was rejected (with the bench's
    random weights: nearly always) and drafts the next one."""
    steps = repeat + 1
    extra = (0 if rate is None else 3) + (3 if pyprofile else 0)  # the breakdown's and the profile's steps
    new_tokens = (steps + extra + 2) * (2 if mtp else 1)  # a step commits up to two tokens with a draft
    prompt = context or PROMPT_FOR_DECODE
    config = EngineConfig(
        max_requests=batch,
        num_blocks=batch * (PagedCache.blocks_for(model.args, prompt + new_tokens, 16) + 1),
        chunk_size=PROMPT_FOR_DECODE,
        token_budget=PROMPT_FOR_DECODE * batch,
        graphs=graphs,
        mtp_draft=1 if mtp else 0,
        # only when asked: this bench also times packages from before the option (perf.md's A/B runs)
        **({"overlap": True} if overlap else {}),
    )
    engine = Engine(model, config)
    if context:
        place_decoding(engine, [context] * batch, new_tokens, gen, fill=True)
    else:
        for _ in range(batch):
            tokens = torch.randint(0, model.args.vocab_size, (PROMPT_FOR_DECODE,), generator=gen)
            engine.add_request(tokens, new_tokens)  # no request finishes (and frees its cache) in a measured step
        engine.step()  # every prompt in one step (the budget holds them all)
    if any(r.in_prefill for r in engine.running):
        raise RuntimeError("decode bench: prompts not prefilled in one step")
    if overlap:  # back to back, no sync between steps: each step's time is the period the host keeps
        sync(device)
        times = [untimed_wall(engine.step) for _ in range(steps)]
        sync(device)
        if pyprofile:

            def profiled_steps():
                for _ in range(3):
                    engine.step()
                sync(device)

            python_profile(profiled_steps, pyprofile)
        return times[1:], None if rate is None else step_roofline(model, engine, batch, device, rate, times[1:])
    times = [timed_step(engine, device) for _ in range(steps)]  # with graphs, the first one captures
    if rate is None:
        return times[1:], None
    if graphs:
        return times[1:], graphed_breakdown(model, engine, batch, device, rate, statistics.median(times[1:]))
    return times[1:], breakdown(model, lambda: engine, batch, device, rate)


def mtp_ms(model, batch: int, repeat: int, gen: torch.Generator, device, rate=None, graphs=False, context=0):
    return decode_ms(model, batch, repeat, gen, device, None, graphs=graphs, mtp=True, context=context)


def overlap_ms(
    model, batch: int, repeat: int, gen: torch.Generator, device, rate=None, graphs=False, context=0, pyprofile=None
):  # fmt: skip
    profile = None if pyprofile is None else pyprofile / f"pyprofile_overlap_{batch}.txt"
    return decode_ms(model, batch, repeat, gen, device, rate, graphs=graphs, context=context, overlap=True,
                     pyprofile=profile)  # fmt: skip


def breakdown(model, next_engine, n_tokens: int, device, rate: float) -> dict:
    """One step with the layers timed (their clean time, and the bytes the step read), one with every op timed, then
    one under the profiler (what the step cost the host: GPU kernel time, launches, syncs)."""
    with StepProbe(model, time_ops=False) as probe:
        timed_step(next_engine(), device)
    clean = probe.summary()
    with StepProbe(model, time_ops=True) as probe:
        wall = timed_step(next_engine(), device)
    timed = probe.summary()
    host = host_profile(lambda: timed_step(next_engine(), device), device)
    op_sum = sum(o["ms"] for o in timed["ops"].values())
    layers = {}
    for i, b in bytes_model(model, clean, n_tokens).items():
        ms = clean["layers"][i]["ms"]
        roof = b["total"] / rate * 1e3
        in_timed = {"timed_ms": timed["layers"][i]["ms"], "op_ms": timed["layers"][i]["op_ms"]}
        layers[i] = dict(b, ms=ms, **in_timed, roofline_ms=roof, pct_roofline=100 * roof / ms)
    total_bytes = sum(v["total"] for v in layers.values())
    layer_ms = sum(v["ms"] for v in layers.values())
    return dict(
        wall_ms=wall,
        host=host,
        ops=dict(sorted(timed["ops"].items(), key=lambda kv: -kv[1]["ms"])),
        op_ms=op_sum,
        outside_ops_ms=wall - op_sum,
        op_ms_outside_layers=timed["op_ms_outside_layers"],
        layers=layers,
        copy_rate_gbs=rate / 1e9,
        pct_roofline_all_layers=100 * total_bytes / rate * 1e3 / layer_ms,
    )


def layer_bytes(model, engine: Engine, n_tokens: int, device) -> int:
    """The bytes the layers of one more step must read (from an eager step: the probe's hooks keep the graphs off,
    and the bytes do not depend on how the ops were launched)."""
    with StepProbe(model, time_ops=False) as probe:
        timed_step(engine, device)
    return sum(b["total"] for b in bytes_model(model, probe.summary(), n_tokens).values())


def step_roofline(model, engine: Engine, n_tokens: int, device, rate: float, times: list[float]) -> dict:
    """An overlapped row's share of the HBM roofline over the whole step (its per-op probes would synchronize)."""
    total = layer_bytes(model, engine, n_tokens, device)
    pct = 100 * total / rate * 1e3 / statistics.median(times)
    return dict(overlapped=True, bytes=total, copy_rate_gbs=rate / 1e9, pct_roofline_step=pct)


def graphed_breakdown(model, engine: Engine, n_tokens: int, device, rate: float, step_ms: float) -> dict:
    """For a step replayed from graphs: the bytes its layers must read (from one eager step: the probe's hooks keep
    the graphs off, and the bytes do not depend on how the ops were launched), the % of the roofline of the whole
    graphed step (an upper bound on the layers' time), and one graphed step under the profiler."""
    total = layer_bytes(model, engine, n_tokens, device)
    host = host_profile(lambda: timed_step(engine, device), device)
    return dict(
        graphed=True,
        host=host,
        split=host_split(engine, device),
        bytes=total,
        copy_rate_gbs=rate / 1e9,
        pct_roofline_step=100 * total / rate * 1e3 / step_ms,
        pieces=len(engine.graphs.pieces),
    )


def host_split(engine: Engine, device) -> dict:
    """One more graphed step with the host's own time inside the attention middles (`OptAttention.requests`), the
    piece replays (input copies and graph launches) and the head, timed by wrapping those methods (no hooks, so the
    graphs stay on); the rest of the step's wall is scheduling, the batch's metadata and the commit (and, at the end,
    the wait for the GPU). "plans (in the middles)": the part of the middles that builds the batch's index plans
    (`Batch.derived` builds: once per step for all layers of a kind, in the first such layer)."""
    from unittest import mock

    from parity.optimized import graphs
    from parity.optimized.batch import Batch
    from parity.optimized.model import OptAttention

    spent = {"middles": [0.0, 0], "plans (in the middles)": [0.0, 0], "replays": [0.0, 0], "head": [0.0, 0]}
    derived, depth = Batch.derived, [0]

    def timed_derived(batch, key, build):
        if depth[0] or key in batch._derived:  # a cached plan, or one built inside another's build
            return derived(batch, key, build)
        depth[0] += 1
        t0 = time.perf_counter()
        try:
            return derived(batch, key, build)
        finally:
            depth[0] -= 1
            spent["plans (in the middles)"][0] += (time.perf_counter() - t0) * 1e3
            spent["plans (in the middles)"][1] += 1

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name][0] += (time.perf_counter() - t0) * 1e3
                spent[name][1] += 1

        return call

    with (
        mock.patch.object(OptAttention, "requests", timed("middles", OptAttention.requests)),
        mock.patch.object(graphs._Piece, "__call__", timed("replays", graphs._Piece.__call__)),
        mock.patch.object(OptimizedTransformer, "head_logits", timed("head", OptimizedTransformer.head_logits)),
        mock.patch.object(Batch, "derived", timed_derived),
    ):
        wall = timed_step(engine, device)
    out = {name: {"ms": ms, "calls": n} for name, (ms, n) in spent.items()}
    inside = spent["plans (in the middles)"][0]  # already in the middles' time
    out["rest"] = {"ms": wall - sum(ms for ms, _ in spent.values()) + inside, "calls": 1}
    out["wall_ms"] = wall
    return out


def host_line(h: dict) -> str:
    return (
        f"Host profile (one more step, under torch.profiler; counts that do not depend on the host): step "
        f"{h['wall_ms']:.2f} ms, GPU kernels {h['gpu_kernel_ms']:.3f} ms "
        f"({100 * h['gpu_kernel_ms'] / h['wall_ms']:.1f} % of it), {h['launches']} kernel launches, "
        f"{h['syncs']} synchronizations, {h['device_to_host_copies']} device-to-host copies, "
        f"{h['aten_calls']} aten calls."
    )


def graphed_md(r: dict) -> list[str]:
    b = r["breakdown"]
    return [
        "",
        f"### {r['backend']} {r['phase']} {r['size']}: step median {r['median_ms']:.2f} ms",
        "",
        f"{b['pieces']} graph pieces; the layers must read {b['bytes'] / 2**20:.1f} MiB: "
        f"{b['pct_roofline_step']:.1f} % of the HBM roofline over the whole step (copy {b['copy_rate_gbs']:.0f} GB/s).",
        "",
        host_line(b["host"]) + f" {b['host']['graph_launches']} graph launches.",
        "",
        f"Host time of one more graphed step ({b['split']['wall_ms']:.2f} ms; method wrappers, no hooks):",
        "",
        "| part | calls | host ms |",
        "|---|---|---|",
        *(f"| {k} | {v['calls']} | {v['ms']:.3f} |" for k, v in b["split"].items() if k != "wall_ms"),
        "",
        "| kernel (the step's 15 longest in GPU time) | runs | GPU ms |",
        "|---|---|---|",
        *(f"| `{name}` | {n} | {ms:.3f} |" for name, n, ms in b["host"]["top_kernels"]),
    ]


def breakdown_md(r: dict) -> list[str]:
    if r["breakdown"].get("graphed"):
        return graphed_md(r)
    if r["breakdown"].get("overlapped"):
        b = r["breakdown"]
        return [
            "",
            f"### {r['backend']} {r['phase']} {r['size']}: step median {r['median_ms']:.2f} ms (back to back)",
            "",
            f"The layers must read {b['bytes'] / 2**20:.1f} MiB: {b['pct_roofline_step']:.1f} % of the HBM roofline "
            f"over the whole step (copy {b['copy_rate_gbs']:.0f} GB/s).",
        ]
    b = r["breakdown"]
    head = f"### {r['backend']} {r['phase']} {r['size']}: op-timed step {b['wall_ms']:.2f} ms"
    lines = ["", head, ""]
    lines += ["| op | calls | GPU ms | host ms | host us / call | % of step |", "|---|---|---|---|---|---|"]
    for name, o in b["ops"].items():
        per_call = 1e3 * o["host_ms"] / o["calls"]
        share = 100 * o["ms"] / b["wall_ms"]
        lines.append(f"| {name} | {o['calls']} | {o['ms']:.3f} | {o['host_ms']:.3f} | {per_call:.0f} | {share:.1f} |")
    host_sum = sum(o["host_ms"] for o in b["ops"].values())
    lines.append(f"| (sum of ops) | | {b['op_ms']:.3f} | {host_sum:.3f} | | {100 * b['op_ms'] / b['wall_ms']:.1f} |")
    lines.append(f"| outside ops | | {b['outside_ops_ms']:.3f} | | | {100 * b['outside_ops_ms'] / b['wall_ms']:.1f} |")
    lines.append(f"| step wall | | {b['wall_ms']:.3f} | | | 100.0 |")
    mb = 1 / 2**20
    lines += [
        "",
        "Layer ms: the layer-only step (events around each block); op-timed: the same layer in the op-timed step "
        "and the part of it inside ops.",
        "",
        "| layer | layer ms | op-timed layer ms | op-timed ops ms | dense MiB | experts touched | expert MiB | "
        "KV + indexer MiB | total MiB | roofline ms | % roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, v in b["layers"].items():
        kv = (v["kv_bytes"] + v["indexer_bytes"]) * mb
        lines.append(
            f"| {i} | {v['ms']:.3f} | {v['timed_ms']:.3f} | {v['op_ms']:.3f} | {v['dense'] * mb:.1f} | "
            f"{v['experts_touched']}/"
            f"{v['n_experts']} | {v['expert_bytes'] * mb:.1f} | {kv:.2f} | {v['total'] * mb:.1f} | "
            f"{v['roofline_ms']:.3f} | {v['pct_roofline']:.1f} |"
        )
    h = b["host"]
    lines += [
        "",
        f"All layers: {b['pct_roofline_all_layers']:.1f} % of the HBM roofline (copy {b['copy_rate_gbs']:.0f} GB/s).",
        "",
        host_line(h),
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backends", nargs="+")
    p.add_argument("--prefill", nargs="*", type=int, help="prompt sizes; none given: no prefill")
    p.add_argument("--decode", nargs="*", type=int, help="batch sizes; none given: no decode")
    p.add_argument("--repeat", type=int)
    p.add_argument("--breakdown", action="store_true", help="per-op and per-layer breakdown, %% of HBM roofline")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, torch backend: checks the code path")
    p.add_argument("--graphs", action="store_true", help="decode also with the layers' per-token work replayed from "
                   "graphs (EngineConfig.graphs)")  # fmt: skip
    p.add_argument("--overlap", action="store_true", help="decode also with each step issued before the last "
                   "step's tokens are read (EngineConfig.overlap; with --graphs, graphed)")  # fmt: skip
    p.add_argument("--pyprofile", action="store_true", help="with --overlap: three more overlapped steps under "
                   "cProfile, the host's functions by own and cumulative time (pyprofile_overlap_B.txt)")  # fmt: skip
    p.add_argument("--mtp", action="store_true", help="decode also with one MTP draft per step (verification, "
                   "replays, drafting; with --graphs also graphed)")  # fmt: skip
    p.add_argument("--layers", type=int, default=2, help="layers of the Flash-shaped model (the host's per-layer "
                   "work shows at depth: V4-Flash has 43; ~0.4 GB of checkpoint each)")  # fmt: skip
    p.add_argument("--context", type=int, default=0, help="decode after this many positions per request, placed "
                   "without a prefill (random cache contents); 0: after a prefilled 64-token prompt")  # fmt: skip
    opts = p.parse_args()
    if opts.pyprofile and not opts.overlap:
        p.error("--pyprofile profiles the --overlap rows: give --overlap too")
    if opts.layers < 1:
        p.error(f"--layers: expected at least 1, got {opts.layers}")
    if opts.context < 0:
        p.error(f"--context: expected at least 0, got {opts.context}")
    # unset options take the run's defaults: the GPU measurement's, or the smoke run's small ones
    defaults = (["torch"], [16], [2], 1) if opts.smoke else (["torch", "triton"], [512, 2048], [1, 8, 64], 5)
    for name, value in zip(("backends", "prefill", "decode", "repeat"), defaults):
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.smoke:
        device, args = torch.device("cpu"), ModelArgs.tiny(max_seq_len=max(512, opts.context + 64))
        model_name = "ModelArgs.tiny() on CPU (smoke: checks the code path; the times mean nothing)"
    else:
        assert torch.cuda.is_available(), "layer_speed needs a CUDA device (or --smoke)"
        device, args = torch.device("cuda"), flash_shaped(opts.layers, opts.context)
        model_name = (
            f"Flash-shaped: V4-Flash widths, 16 routed experts, {opts.layers} layers alternating CSA(4) and HCA(128), "
            "MTP drafted only in the mtp rows"
        )
    opts.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "model": model_name,
    }
    print(meta, flush=True)
    # 1 GiB each way on the GPU: large against L2, long against the event resolution
    rate = copy_rate(device, 1 << 30 if device.type == "cuda" else 1 << 26) if opts.breakdown else None
    if rate is not None:
        print(f"copy rate {rate / 1e9:.0f} GB/s", flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ckpt = write_checkpoint(d, args, seed=0)
        print(f"checkpoint written in {time.time() - t0:.1f}s", flush=True)
        for backend in opts.backends:
            config = OpsConfig(default=backend)
            ops = resolve_ops(config)
            model, _ = build_model(ckpt, device=device, factory=lambda a, ops=ops: OptimizedTransformer(a, ops))
            fallback = sorted(op for op, b in config.backends().items() if b != backend)
            at = dict(context=opts.context)
            runs = [("prefill", opts.prefill, prefill_ms), ("decode", opts.decode, partial(decode_ms, **at))]
            if opts.graphs:
                runs.append(("decode graphs", opts.decode, partial(decode_ms, graphs=True, **at)))
            if opts.overlap:  # breakdown: the step's share of the roofline only (the per-op probes synchronize)
                profile = opts.out if opts.pyprofile else None
                runs.append(("decode overlap", opts.decode, partial(overlap_ms, graphs=opts.graphs, pyprofile=profile,
                                                                    **at)))  # fmt: skip
            if opts.mtp:  # no breakdown: its probes time plain decode steps
                runs.append(("mtp decode", opts.decode, partial(mtp_ms, graphs=False, **at)))
                if opts.graphs:
                    runs.append(("mtp decode graphs", opts.decode, partial(mtp_ms, graphs=True, **at)))
            for kind, sizes, fn in runs:
                for n in sizes:
                    times, parts = fn(model, n, opts.repeat, gen, device, rate)
                    med = statistics.median(times)
                    row = dict(backend=backend, phase=kind, size=n, median_ms=med, per_layer_ms=med / args.n_layers,
                               min_ms=min(times), fallback=fallback)  # fmt: skip
                    print(json.dumps(row), flush=True)
                    if parts is not None:
                        row["breakdown"] = parts
                        print("\n".join(breakdown_md(row)), flush=True)
                    rows.append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    (opts.out / "layer_speed.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [
        f"{meta}",
        "",
        "| backend | phase | T or B | step median ms | per layer ms (bound) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['median_ms']:.2f} | {r['per_layer_ms']:.2f}"
        lines.append(f"| {r['backend']} | {r['phase']} | {r['size']} | {ms} |")
    if opts.breakdown:
        lines += ["", "## Per-op breakdown", "", "Bytes model and roofline:"]
        lines += [f"- {a}" for a in ASSUMPTIONS]
        for r in rows:
            if "breakdown" in r:  # the MTP rows are timed without one
                lines += breakdown_md(r)
    (opts.out / "layer_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

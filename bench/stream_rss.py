"""RSS and wall time per layer of a layer-streamed verdict on a synthetic checkpoint with V4-Flash widths (CPU).

    .venv/bin/python bench/stream_rss.py [--case cases/flash_stream.toml] [--ckpt DIR] [--requests 7:1,5:1]
        [--threads N] [--compare]

Writes (or reuses) the case's synthetic checkpoint (default case: Flash widths, 8 layers + MTP, 8 routed experts,
vocabulary 8192; see the case file), runs every capture of the decode-exact verdict (targets, chained engine,
reference, forced engine) with streamed weights, and prints:
- peak RSS of the streamed span against one layer's weight bytes, the resident weights and the activations (the
  line `parity run --stream` prints, `parity.stream.measure`);
- RSS over the run (sampled at every block event), and per block: reads, mean read time, mean forward time;
- with `--compare`: the same captures with the whole model loaded (its peak RSS) and whether they are bitwise equal.
The streamed span runs first in the process, so the kernel's high-water mark (reset at its start) is its own.
Exit 1 if the bound is exceeded or the captures differ.
"""

import argparse
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from parity import machine  # noqa: E402
from parity.capture.session import capture  # noqa: E402
from parity.cases import RequestSpec, load_case  # noqa: E402
from parity.checkpoint import Checkpoint, write_checkpoint  # noqa: E402
from parity.run import run_inputs  # noqa: E402
from parity.stream import weights  # noqa: E402
from parity.stream.check import first_difference  # noqa: E402
from parity.stream.measure import StreamMeasure, model_bytes  # noqa: E402
from parity.stream.memory import GiB, PeakRSS, rss  # noqa: E402

MiB = 2**20


def per_block(trace: list) -> dict[str, dict]:
    """Reads, mean read seconds and mean forward seconds per block, from the streamer's trace."""
    out: dict[str, dict] = defaultdict(lambda: {"reads": 0, "read_s": [], "run_s": []})
    start: dict[str, float] = {}
    for name, event, t, _ in trace:
        if event == "load":
            start[name] = t
        elif event == "run":
            if name in start:
                out[name]["reads"] += 1
                out[name]["read_s"].append(t - start.pop(name))
            out[name]["t_run"] = t
        elif event == "done" and "t_run" in out[name]:
            out[name]["run_s"].append(t - out[name].pop("t_run"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default=str(ROOT / "cases" / "flash_stream.toml"))
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/parity-flash-stream"))
    p.add_argument("--requests", help="replace the case's requests: PROMPT:DECODES,... (e.g. 7:1,5:1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compare", action="store_true", help="also run with the whole model loaded and compare")
    a = p.parse_args()
    case = load_case(a.case)
    if a.requests:
        reqs = [tuple(int(x) for x in r.split(":")) for r in a.requests.split(",")]
        case = replace(case, requests=tuple(RequestSpec(prompt_len=n, decode_steps=d) for n, d in reqs))
    if a.threads:
        torch.set_num_threads(a.threads)
    args = case.model_args()
    if not (a.ckpt / "parity_synth.json").is_file() or Checkpoint(a.ckpt).args != args:
        t = time.perf_counter()
        write_checkpoint(a.ckpt, args, seed=case.seed, init=case.init)
        print(f"wrote {a.ckpt} in {time.perf_counter() - t:.0f}s")
    name, block, resident, buffers = model_bytes(args)
    print(f"machine: {machine.summary()}; torch {torch.__version__}; python {sys.version.split()[0]}")
    print(f"load average at the start: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print(
        f"shape: {case.name} (dim {args.dim}, {args.n_heads} heads x {args.head_dim}, q-LoRA {args.q_lora_rank}, "
        f"o-LoRA {args.o_groups} x {args.o_lora_rank}, MoE inter {args.moe_inter_dim}), {args.n_layers} layers + "
        f"{args.n_mtp_layers} MTP, {args.n_routed_experts} routed experts ({args.expert_format}), vocab "
        f"{args.vocab_size}, compress ratios {list(args.compress_ratios)}; requests "
        f"{[(r.prompt_len, r.decode_steps) for r in case.requests]} (prompt, decodes)"
    )
    print(
        f"weights: largest block {name} {block / MiB:.0f} MiB; resident (embed, head, norms) {resident / MiB:.0f} "
        f"MiB; model buffers (caches, RoPE) {buffers / MiB:.0f} MiB"
    )
    inp = run_inputs(case, a.ckpt)

    weights.TRACE = []
    t0 = time.perf_counter()
    with StreamMeasure(case, a.ckpt) as m:
        streamed = capture(replace(inp, stream=True))
        m.held(streamed)
    wall = time.perf_counter() - t0
    trace, weights.TRACE = weights.TRACE, None
    mem = m.memory()
    print(f"streamed: {wall:.0f}s wall (targets, chained engine, reference, forced engine)")
    print(mem.line())
    start = mem.start
    series = [(t, r) for *_, t, r in trace]
    if series:
        marks = [series[int(i * (len(series) - 1) / 10)] for i in range(11)]
        print("RSS over the run above the start (MiB, 11 points over the block events): "
              + " ".join(f"{(r - start) / MiB:.0f}" for _, r in marks))  # fmt: skip
        top = max(series, key=lambda x: x[1])
        print(f"highest RSS at a block event: {(top[1] - start) / MiB:.0f} MiB above the start")
    print(f"{'block':>9} {'reads':>6} {'read s':>8} {'forward s':>10} {'max RSS MiB':>12}")
    rss_max: dict[str, int] = defaultdict(int)
    for blk, _, _, r in trace:
        rss_max[blk] = max(rss_max[blk], r - start)
    for blk, s in sorted(per_block(trace).items(), key=lambda kv: (kv[0].split(".")[0] != "layers", kv[0])):
        mean = lambda v: statistics.fmean(v) if v else 0.0  # noqa: E731
        print(f"{blk:>9} {s['reads']:>6} {mean(s['read_s']):>8.2f} {mean(s['run_s']):>10.2f} "
              f"{rss_max[blk] / MiB:>12.0f}")  # fmt: skip
    ok = mem.within()
    if a.compare:
        t0 = time.perf_counter()
        rss_before = rss()
        with PeakRSS() as whole_peak:
            whole = capture(inp)
        diff = first_difference(whole, streamed)
        print(
            f"whole model: {time.perf_counter() - t0:.0f}s wall; peak RSS {whole_peak.peak / GiB:.2f} GiB "
            f"({rss_before / GiB:.2f} GiB before, still holding the streamed captures); streamed vs whole: "
            f"{'bitwise equal, every record of every run' if diff is None else diff}"
        )
        ok = ok and diff is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

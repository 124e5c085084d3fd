"""Whole-step time of the optimized engine per backend on a Flash-shaped model (one CUDA GPU).

    PYTHONPATH=. python3 bench/layer_speed.py --out DIR [--backends torch triton] [--prefill 512 2048]
                                              [--decode 1 8 64] [--repeat 5]

The model is `bench/gpu_checks.py flash`'s: V4-Flash widths (dim 4096, 64 heads of 512, q-LoRA 1024, o-LoRA 8 x 1024,
indexer 64 x 128, top-k 512, expert 2048, window 128) with 16 routed experts (of 256) and two layers, one CSA
(compress ratio 4) and one HCA (128); the engine drafts no MTP tokens. Each number is one engine step
(`Engine.step`: scheduling, the forward of both layers, the head, the commit), CUDA-synchronized, median of
`--repeat` after one warm-up step that compiles the Triton kernels:
- prefill T: one request of T prompt tokens in one chunk (a fresh engine per repeat);
- decode B: B requests of 64 prompt tokens, prefilled, then one-token decode steps with all B in the batch.
"Per layer" is the step divided by the two layers, an upper bound (the step also embeds, runs the head and
schedules). The ops of a backend come from `OpsConfig(default=backend)`; ops a backend does not register fall back
to torch (listed in the output). Writes layer_speed.json and layer_speed.md to --out.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from parity.checkpoint import build_model, write_checkpoint
from parity.config import ModelArgs
from parity.optimized.engine import Engine, EngineConfig
from parity.optimized.model import OptimizedTransformer
from parity.optimized.ops import OpsConfig, resolve_ops

PROMPT_FOR_DECODE = 64


def flash_shaped() -> ModelArgs:
    # the MTP layer is in the checkpoint (as in gpu_checks.py) but the engine drafts nothing (mtp_draft 0)
    return ModelArgs.flash(
        n_layers=2, n_hash_layers=1, n_routed_experts=16, vocab_size=16384, compress_ratios=(4, 128, 0)
    )


def timed_step(engine: Engine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def prefill_ms(model, tokens: int, repeat: int, gen: torch.Generator) -> list[float]:
    config = EngineConfig(max_requests=1, num_blocks=tokens // 16 + 8, chunk_size=tokens, token_budget=tokens)
    times = []
    for i in range(repeat + 1):
        engine = Engine(model, config)
        engine.add_request(torch.randint(0, model.args.vocab_size, (tokens,), generator=gen), 1)
        t = timed_step(engine)
        if i:  # the first one compiles
            times.append(t)
    return times


def decode_ms(model, batch: int, repeat: int, gen: torch.Generator) -> list[float]:
    steps = repeat + 1
    config = EngineConfig(
        max_requests=batch,
        num_blocks=batch * ((PROMPT_FOR_DECODE + steps + 2) // 16 + 2),
        chunk_size=PROMPT_FOR_DECODE,
        token_budget=PROMPT_FOR_DECODE * batch,
    )
    engine = Engine(model, config)
    for _ in range(batch):
        engine.add_request(torch.randint(0, model.args.vocab_size, (PROMPT_FOR_DECODE,), generator=gen), steps + 1)
    engine.step()  # every prompt in one step (the budget holds them all)
    if any(r.in_prefill for r in engine.running):
        raise RuntimeError("decode bench: prompts not prefilled in one step")
    times = [timed_step(engine) for _ in range(steps)]
    return times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backends", nargs="+", default=["torch", "triton"])
    p.add_argument("--prefill", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--decode", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--repeat", type=int, default=5)
    opts = p.parse_args()
    assert torch.cuda.is_available(), "layer_speed needs a CUDA device"
    opts.out.mkdir(parents=True, exist_ok=True)
    args = flash_shaped()
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "model": "Flash-shaped: V4-Flash widths, 16 routed experts, layers CSA(4) + HCA(128), MTP not drafted",
    }
    print(meta, flush=True)
    rows = []
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ckpt = write_checkpoint(d, args, seed=0)
        print(f"checkpoint written in {time.time() - t0:.1f}s", flush=True)
        for backend in opts.backends:
            config = OpsConfig(default=backend)
            ops = resolve_ops(config)
            model, _ = build_model(ckpt, device="cuda", factory=lambda a, ops=ops: OptimizedTransformer(a, ops))
            fallback = sorted(op for op, b in config.backends().items() if b != backend)
            for kind, sizes, fn in (("prefill", opts.prefill, prefill_ms), ("decode", opts.decode, decode_ms)):
                for n in sizes:
                    times = fn(model, n, opts.repeat, gen)
                    med = statistics.median(times)
                    row = dict(backend=backend, phase=kind, size=n, median_ms=med, per_layer_ms=med / args.n_layers,
                               min_ms=min(times), fallback=fallback)  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del model
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
    (opts.out / "layer_speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

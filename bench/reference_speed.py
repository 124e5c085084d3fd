"""CPU speed of the reference: greedy generation on the tiny model, and the reference kernels one call at a time.

    python bench/reference_speed.py [--baseline REV] [--decode-steps 8] [--repeat 5] [--no-large] [--json out.json]

Times (medians of `--repeat` runs, wall time and this process's CPU time, which is the steadier of the two on a
shared machine):
- the reference's own `greedy_generate` on the tiny model: prefill of a 37-token prompt, then one-token decodes,
  each with its MTP draft (a decode step is one main forward plus one MTP forward);
- each `parity.reference.kernels` function at the tiny model's shapes (decode and prefill) and at V4-Flash widths
  (dim 4096, 64 heads of 512, 2048-wide experts; one call each).

`--baseline REV` also loads `parity/reference/kernels.py` and `parity/formats.py` of git revision REV (e.g. `HEAD~2`)
into this process and times them in alternation with the working tree's, on the same inputs (a baseline model is
the working tree's model code wired to the baseline kernels), so that both see the same machine load; it checks that
both give bitwise-identical outputs and prints the speedup.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

# time the checkout this file is in, whatever `parity` the environment has installed
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import parity  # noqa: E402
import parity.reference.model as model_module  # noqa: E402
from parity.checkpoint import build_model, write_checkpoint  # noqa: E402
from parity.config import ModelArgs  # noqa: E402
from parity.formats import quantize_fp4_groups, quantize_fp8_blocks  # noqa: E402
from parity.reference import kernels  # noqa: E402
from parity.reference.generate import greedy_generate  # noqa: E402


def load_baseline(rev: str, tmp: Path) -> types.ModuleType:
    """The kernels module of git revision `rev` (with that revision's formats.py), as a separate module."""

    def show(path):
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    (tmp / "baseline_formats.py").write_text(show("parity/formats.py"))
    src = show("parity/reference/kernels.py").replace("from parity.formats import", "from baseline_formats import")
    (tmp / "baseline_kernels.py").write_text(src)
    sys.path.insert(0, str(tmp))
    spec = importlib.util.spec_from_file_location("baseline_kernels", tmp / "baseline_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_class(kernel_module: types.ModuleType):
    """The working tree's Transformer, wired to `kernel_module` instead of parity.reference.kernels."""
    src = Path(model_module.__file__).read_text()
    src = src.replace("from parity.reference import kernels", "kernels = _KERNELS")
    module = types.ModuleType("baseline_model")
    module.__dict__["_KERNELS"] = kernel_module
    exec(compile(src, model_module.__file__, "exec"), module.__dict__)
    return module.Transformer


def timed(fns: dict, repeat: int, min_s: float = 0.0) -> dict:
    """{name: (median wall s, median CPU s)} per call of each fn(), the fns run in alternation (same conditions).
    Each of the `repeat` measurements times enough back-to-back calls to last about `min_s`."""
    calls = {}
    for name, fn in fns.items():  # warm-up (memos, allocator), and the number of calls per measurement
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, round(min_s / max(time.perf_counter() - t0, 1e-6)))
    n = min(calls.values())
    walls, cpus = {k: [] for k in fns}, {k: [] for k in fns}
    for i in range(repeat):
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            fn = fns[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            walls[name].append((time.perf_counter() - w0) / n)
            cpus[name].append((time.process_time() - c0) / n)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def bench_generation(args, impls: dict, ckpt) -> list:
    """Rows (name, {impl: (wall, cpu)}): prefill, one decode step (median over all steps), whole generation."""
    margs = ModelArgs.tiny()
    prompt = torch.randint(0, margs.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    models = {name: build_model(ckpt, factory=model_class(mod))[0] for name, mod in impls.items()}
    gens = {name: [] for name in impls}

    def run(name, steps):
        model = models[name]
        model.reset_buffers()
        gens[name].append(greedy_generate(model, prompt, steps))

    prefill = timed({n: lambda n=n: run(n, 0) for n in impls}, args.repeat)
    full = timed({n: lambda n=n: run(n, args.decode_steps) for n in impls}, args.repeat)
    # a decode step: (prefill + decodes - prefill) / decodes, wall and CPU
    step = {n: tuple((f - p) / args.decode_steps for f, p in zip(full[n], prefill[n])) for n in impls}
    rows = [
        (f"prefill of {args.prompt_len} tokens (+MTP)", prefill),
        ("one decode step (main + MTP forward)", step),
        (f"prefill + {args.decode_steps} decode steps", full),
    ]
    if len(impls) > 1:
        a, b = (gens[n][-1] for n in impls)
        same = a.tokens == b.tokens and a.mtp_drafts == b.mtp_drafts
        same = same and all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a.logits, b.logits))
        print(f"generations bitwise identical across implementations: {same}")
        if not same:
            raise SystemExit("the implementations disagree")
    return rows


def kernel_cases(large: bool):
    """(name, fn(kernel_module)) pairs with inputs built once."""
    g = torch.Generator().manual_seed(0)
    e8m0 = torch.float8_e8m0fnu

    def bf16(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    def gemms(tag, m, n, k):
        a, a_s = kernels.act_quant(bf16(m, k), 128, "ue8m0", e8m0)
        w8, s8 = quantize_fp8_blocks(torch.randn(n, k, generator=g) * k**-0.5)
        w4, s4 = quantize_fp4_groups(torch.randn(n, k, generator=g) * k**-0.5)
        w4 = w4.view(torch.float4_e2m1fn_x2)
        x = bf16(m, k)
        yield f"act_quant {tag} [{m},{k}]", lambda K: K.act_quant(x, 128, "ue8m0", e8m0)
        yield f"fp8_gemm {tag} M{m} N{n} K{k}", lambda K: K.fp8_gemm(a, a_s, w8, s8, e8m0)
        yield f"fp4_gemm {tag} M{m} N{n} K{k}", lambda K: K.fp4_gemm(a, a_s, w4, s4, e8m0)

    def attn(tag, m, h, d, n, k):
        q, kv = bf16(1, m, h, d), bf16(1, n, d)
        sink = torch.randn(h, generator=g)
        idx = torch.randint(0, n, (1, m, k), generator=g).int()
        yield f"sparse_attn {tag} m{m} h{h} d{d} k{k}", lambda K: K.sparse_attn(q, kv, sink, idx, d**-0.5)

    def misc(tag, s, dim, hd):
        mixes = torch.randn(1, s, 24, generator=g)
        sc, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
        yield f"hc_split_sinkhorn {tag} [{s}]", lambda K: K.hc_split_sinkhorn(mixes, sc, base, 4, 20, 1e-6)
        x = bf16(1, s, hd)
        yield (
            f"hadamard + fp4_act_quant {tag} [{s},{hd}]",
            lambda K: K.fp4_act_quant(K.hadamard_transform(x, hd**-0.5), 32, True),
        )
        kv = bf16(1, s, dim)
        yield (
            f"act_quant kv in place {tag} [{s},{dim}]",
            lambda K: K.act_quant(kv.clone()[..., :-64], 64, "ue8m0", e8m0, True),
        )

    t = ModelArgs.tiny()
    for m, phase in ((1, "decode"), (37, "prefill")):
        yield from gemms(f"tiny-{phase}", m, t.dim, t.dim)
        yield from gemms(f"tiny-expert-{phase}", m, t.moe_inter_dim, t.dim)
    yield from attn("tiny-decode", 1, t.n_heads, t.head_dim, 200, t.window_size + t.index_topk)
    yield from attn("tiny-prefill", 37, t.n_heads, t.head_dim, 37, 37)
    yield from misc("tiny-decode", 1, t.head_dim, t.index_head_dim)
    yield from misc("tiny-prefill", 37, t.head_dim, t.index_head_dim)
    if large:
        f = ModelArgs.flash()
        yield from gemms("flash-wq_a", 1, f.q_lora_rank, f.dim)
        yield from gemms("flash-expert", 1, f.moe_inter_dim, f.dim)
        yield from gemms("flash-expert-prefill", 64, f.moe_inter_dim, f.dim)
        yield from attn("flash-decode", 1, f.n_heads, f.head_dim, 1024, f.window_size + f.index_topk)
        yield from attn("flash-prefill", 64, f.n_heads, f.head_dim, 64, 64)
        yield from misc("flash", 64, f.head_dim, f.index_head_dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="REV", help="also time the kernels of this git revision, in alternation")
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=37)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--no-large", action="store_true", help="skip the V4-Flash-width kernel rows")
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        impls = {"current": kernels}
        if args.baseline:
            impls[args.baseline] = load_baseline(args.baseline, Path(tmp))
        print(f"parity from {Path(parity.__file__).parent}; torch {torch.__version__}, {args.threads} thread(s)")
        header = " ".join(f"{n + ' wall':>14s} {n + ' cpu':>13s}" for n in impls)
        print(f"{'ms, medians of ' + str(args.repeat):52s} {header}" + ("   speedup (cpu)" if args.baseline else ""))
        results = {}

        def show(name, times):
            results[name] = {n: {"wall_ms": 1e3 * w, "cpu_ms": 1e3 * c} for n, (w, c) in times.items()}
            cells = " ".join(f"{1e3 * w:14.2f} {1e3 * c:13.2f}" for w, c in times.values())
            speedup = ""
            if args.baseline:
                (_, c_new), (_, c_old) = times.values()
                speedup = f"   {c_old / c_new:6.2f}x"
            print(f"{name:52s} {cells}{speedup}", flush=True)

        if not args.no_generation:
            ckpt = write_checkpoint(Path(tmp) / "tiny", ModelArgs.tiny(), seed=0)
            for name, times in bench_generation(args, impls, ckpt):
                show("tiny generation: " + name, times)
        if not args.no_kernels:
            cases = list(kernel_cases(not args.no_large))  # inputs and weights made outside inference mode
            with torch.inference_mode():  # as the model runs them
                for name, fn in cases:
                    show(name, timed({n: lambda fn=fn, k=k: fn(k) for n, k in impls.items()}, args.repeat, 0.02))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"parity": parity.__file__, "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time and check the Triton kernels of hc_pre, hc_post, hc_head, rms_norm, head_norm and rope on one GPU.

    PYTHONPATH=. python3 bench/triton_mhc.py --out DIR [--tokens 1 8 64 512 4096] [--models flash pro]

For DeepSeek-V4-Flash (D 4096, 64 heads) and V4-Pro (D 7168, 128 heads) at each token count T:
- the median time (`triton.testing.do_bench`, L2 flushed before every run) of the triton kernel and of the torch
  backend (the reference math), and the kernel's % of the HBM roofline: its compulsory bytes (every input read
  once, every output written once) at the device-to-device copy bandwidth measured in the same run;
- a correctness check on the same inputs against the torch backend on this GPU, as the registry entries claim:
  torch.equal for hc_post and rope; for the others, no element further from the float64 golden than the torch
  backend is, plus the entry's stated allowance (the same formulas as tests/optimized/ops/test_<op>.py).
Then a block-size sweep of hc_pre and hc_head (tokens per program, columns per program, warps; below 16 tokens
also the whole block's finish instead of the narrow finisher), whose outputs must be bit-identical to the default
configuration's (the kernels' batch-invariance claim on this GPU) and whose fastest entry says which default to
keep; also K pieces (KSPLIT) of 256, 512 and 1024 elements, which regroup exact float64 sums and so must keep the
bits too (the default picks one by launch size, `_mhc.config`), warps at the default tiles, and hc_pre's collapse
as a launch of its own or by the finisher alone (SHARE off). The sweep times CUDA graphs (the decode defaults are
picked by GPU time).
Prints the tables and writes triton_mhc.json and triton_mhc.md into DIR. Exit code 1 if a check fails.
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from bench.cuda_graph import captured
from parity.optimized.ops import OpsConfig, resolve_ops

OPS = ("hc_pre", "hc_post", "hc_head", "rms_norm", "head_norm", "rope")
MODELS = {"flash": dict(dim=4096, heads=64), "pro": dict(dim=7168, heads=128)}
HEAD_DIM, ROPE_DIM, HC, EPS = 512, 64, 4, 1e-6


def ulp_of(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mag = g.abs().to(dtype)
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def excess_ratio(got, want, gold, ulps) -> float:
    """max over elements of (|got - gold| - |want - gold|) / (ulps * ulp(gold)): how much of its allowance the
    kernel uses beyond the twin's own error (<= 1 passes; with ulps 0, any excess is inf). NaN at other places
    than the twin's: inf."""
    a, b = want.double(), got.double()
    if not torch.equal(a.isnan(), b.isnan()):
        return math.inf
    fin = a.isfinite() & b.isfinite()
    ex = torch.where(fin, (b - gold).abs() - (a - gold).abs(), 0.0)
    unit = (ulp_of(gold, got.dtype) * ulps).expand_as(ex)
    ratio = torch.where(unit > 0, ex / unit.clamp_min(1e-300), torch.where(ex > 0, math.inf, 0.0))
    return float(ratio.max()) if ratio.numel() else 0.0


# ---- float64 goldens and allowances (the registry tolerances; see the op tests) -----------------------------------


def hc_pre_golden(x, fn, scale, base, iters=20):
    xf = x.flatten(1).double()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)
    m = (xf @ fn.double().T) * r
    s, b = scale.double(), base.double()
    pre = torch.sigmoid(m[:, :HC] * s[0] + b[:HC]) + EPS
    post = 2 * torch.sigmoid(m[:, HC : 2 * HC] * s[1] + b[HC : 2 * HC])
    c = torch.softmax((m[:, 2 * HC :] * s[2] + b[2 * HC :]).unflatten(-1, (HC, HC)), -1) + EPS
    c = c / (c.sum(-2, keepdim=True) + EPS)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + EPS)
        c = c / (c.sum(-2, keepdim=True) + EPS)
    y = (pre[..., None] * x.double()).sum(1)
    S = (xf.abs() @ fn.double().abs().T) * r
    A = (pre[..., None] * x.double()).abs().sum(1)
    sa = s.abs()
    y_ulps = 1 + 2.0**-24 * A * (4 + 8 + sa[0] * S[:, :HC].amax(-1, keepdim=True)) / ulp_of(y, torch.bfloat16)
    post_ulps = 8 + sa[1] * S[:, HC : 2 * HC]
    comb_ulps = 16 + 2 * sa[2] * S[:, 2 * HC :].amax(-1)[:, None, None]
    return (y, post, c), (y_ulps, post_ulps, comb_ulps)


def hc_head_golden(x, fn, scale, base):
    xf = x.flatten(1).double()
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS)
    m = (xf @ fn.double().T) * r
    pre = torch.sigmoid(m * scale.double() + base.double()) + EPS
    y = (pre[..., None] * x.double()).sum(1)
    S = ((xf.abs() @ fn.double().abs().T) * r).amax(-1, keepdim=True)
    A = (pre[..., None] * x.double()).abs().sum(1)
    return y, 1 + 2.0**-24 * A * (4 + 8 + scale.double().abs() * S) / ulp_of(y, torch.bfloat16)


def rms_norm_golden(x, w):
    xd = x.double()
    return w.double() * (xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + EPS))


def head_norm_model(q):
    """The float64-exact model of the twin's five bf16 steps (what the kernel computes)."""
    bf = torch.bfloat16
    qf = q.float()
    sq = (qf * qf).to(bf)
    mean = (sq.double().sum(-1, keepdim=True).float() / q.shape[-1]).to(bf)
    t = (mean.float() + torch.tensor(EPS, dtype=torch.float32, device=q.device)).to(bf)
    r = (1 / torch.sqrt(t.double())).float().to(bf)
    return (qf * r.float()).to(bf)


# ---- cases ---------------------------------------------------------------------------------------------------------


def make_inputs(model: str, t: int, dev: str, g: torch.Generator) -> dict:
    d, h = MODELS[model]["dim"], MODELS[model]["heads"]
    bf = torch.bfloat16

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dev)

    inp = dict(
        x4=randn(t, HC, d).to(bf),
        fn_pre=randn((2 + HC) * HC, HC * d, std=(HC * d) ** -0.5),
        scale_pre=(0.5 + torch.rand(3, generator=g)).to(dev),
        base_pre=randn((2 + HC) * HC, std=0.1),
        fn_head=randn(HC, HC * d, std=(HC * d) ** -0.5),
        scale_head=(0.5 + torch.rand(1, generator=g)).to(dev),
        base_head=randn(HC, std=0.1),
        x=randn(t, d).to(bf),
        w=(1 + randn(d, std=0.1)).to(bf).float(),
        q=(randn(t, h, HEAD_DIM) * 2).to(bf),
        freqs=torch.polar(torch.ones(t, ROPE_DIM // 2), torch.rand(t, ROPE_DIM // 2, generator=g) * 100).to(dev),
    )
    return inp


def op_calls(name: str, ops, inp: dict):
    """(callable for timing, compulsory bytes)."""
    t, hc, d = inp["x4"].shape
    h = inp["q"].shape[1]
    if name == "hc_pre":
        args = (inp["x4"], inp["fn_pre"], inp["scale_pre"], inp["base_pre"], (0, t), EPS, HC, 20, EPS)
        return (lambda: ops.hc_pre(*args)), t * hc * d * 2 + inp["fn_pre"].numel() * 4 + t * d * 2 + t * 20 * 4
    if name == "hc_post":
        post, comb = inp["post"], inp["comb"]
        return (lambda: ops.hc_post(inp["x"], inp["x4"], post, comb)), t * d * 2 + 2 * t * hc * d * 2 + t * 20 * 4
    if name == "hc_head":
        args = (inp["x4"], inp["fn_head"], inp["scale_head"], inp["base_head"], (0, t), EPS, EPS)
        return (lambda: ops.hc_head(*args)), t * hc * d * 2 + inp["fn_head"].numel() * 4 + t * d * 2
    if name == "rms_norm":
        return (lambda: ops.rms_norm(inp["x"], inp["w"], EPS, (0, t))), 2 * t * d * 2 + d * 4
    if name == "head_norm":
        q = inp["q"].clone()
        return (lambda: ops.head_norm(q, EPS, (0, t))), 2 * t * h * HEAD_DIM * 2
    if name == "rope":
        q = inp["q"].clone()
        return (lambda: ops.rope(q[..., -ROPE_DIM:], inp["freqs"])), 2 * t * h * ROPE_DIM * 2 + t * ROPE_DIM * 4
    raise KeyError(name)


def check(name: str, tri, ref, inp: dict) -> tuple[str, float]:
    """(claim, worst ratio): bitwise ops give 0.0 when equal, inf otherwise; the others the largest share of the
    allowance used beyond the twin's own error (`excess_ratio`)."""
    t = inp["x4"].shape[0]
    if name == "hc_pre":
        args = (inp["x4"], inp["fn_pre"], inp["scale_pre"], inp["base_pre"], (0, t), EPS, HC, 20, EPS)
        got, want = tri.hc_pre(*args), ref.hc_pre(*args)
        gold, ulps = hc_pre_golden(inp["x4"], inp["fn_pre"], inp["scale_pre"], inp["base_pre"])
        return "tolerance", max(excess_ratio(a, b, g, u) for a, b, g, u in zip(got, want, gold, ulps))
    if name == "hc_head":
        args = (inp["x4"], inp["fn_head"], inp["scale_head"], inp["base_head"], (0, t), EPS, EPS)
        gold, ulps = hc_head_golden(inp["x4"], inp["fn_head"], inp["scale_head"], inp["base_head"])
        return "tolerance", excess_ratio(tri.hc_head(*args), ref.hc_head(*args), gold, ulps)
    if name == "rms_norm":
        gold = rms_norm_golden(inp["x"], inp["w"])
        got, want = tri.rms_norm(inp["x"], inp["w"], EPS, (0, t)), ref.rms_norm(inp["x"], inp["w"], EPS, (0, t))
        return "tolerance", excess_ratio(got, want, gold, torch.tensor(0.5, dtype=torch.float64, device=gold.device))
    if name == "head_norm":
        model = head_norm_model(inp["q"]).double()
        got, want = tri.head_norm(inp["q"].clone(), EPS, (0, t)), ref.head_norm(inp["q"].clone(), EPS, (0, t))
        zero = torch.zeros((), dtype=torch.float64, device=model.device)
        return "model, 0 ulp", excess_ratio(got, want, model, zero)
    if name == "hc_post":
        args = (inp["x"], inp["x4"], inp["post"], inp["comb"])
        return "bitwise", 0.0 if torch.equal(tri.hc_post(*args), ref.hc_post(*args)) else math.inf
    if name == "rope":
        a, b = inp["q"].clone(), inp["q"].clone()
        tri.rope(a[..., -ROPE_DIM:], inp["freqs"])
        ref.rope(b[..., -ROPE_DIM:], inp["freqs"])
        return "bitwise", 0.0 if torch.equal(a, b) else math.inf
    raise KeyError(name)


def graph_ms(fn, bench, calls: int = 20) -> float:
    """ms per call of `calls` calls captured in one CUDA graph and replayed: the GPU's time without the host's
    per-call launch overhead (Python argument handling, allocations), which bounds the smallest batches."""
    return bench(captured([fn], calls).replay) / calls


def passed(claim: str, ratio: float) -> bool:
    return ratio <= 1.0


def copy_bandwidth(bench, dev) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write) of a 2 GiB copy."""
    src = torch.empty(1 << (30 if dev == "cuda" else 24), dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# (8 warps: the finisher's [rows, 4, 4] Sinkhorn tile over twice the threads, half the divisions each; compiled for
# sm_90 at 64 tokens its per-thread code has 11 division slow-path calls against 22 with 4 warps)
SWEEP = [dict(BT=16, BD=256, num_warps=4), dict(BT=32, BD=256, num_warps=4), dict(BT=32, BD=128, num_warps=2),
         dict(BT=64, BD=128, num_warps=4), dict(BT=16, BD=128, num_warps=2),
         dict(BT=16, BD=256, num_warps=8)]  # fmt: skip
# below 16 tokens also the whole 16-row block's finish (the default before the narrow finisher, `_mhc.finisher`)
WHOLE_BLOCK = dict(BT=16, BD=256, BTF=16, num_warps=4)
# K pieces (smaller: more split programs, fewer serial chunks each) at the default tile: the decode GEMV's latency
K_PIECES = [dict(BT=16, BD=256, num_warps=4, KSPLIT=k) for k in (256, 512, 1024)]
# prefill: larger pieces down to one (no partials: the mixes finished in the GEMV's registers), where the token
# blocks alone fill the SMs
K_PREFILL = [dict(BT=16, BD=256, num_warps=w, KSPLIT=k) for k in (4096, 1 << 20) for w in (2, 4)]
# and at the 32-row blocks prefill takes (session 15): larger K pieces, more warps
K_PREFILL += [dict(BT=32, BD=256, num_warps=w, KSPLIT=k) for k in (2048, 4096) for w in (4, 8)]
# and 64-row blocks (on sm_90 the tensor-core mixer GEMM of a 64-row tile is a wgmma, of fewer rows an mma.sync: the
# same bits is the claim), K pieces up to one
K_PREFILL += [dict(BT=64, BD=256, num_warps=w, KSPLIT=k) for k in (1024, 2048, 4096, 1 << 20) for w in (4, 8)]
# and 64-row blocks of 128 columns (the default from 4096 tokens, session 29: 256 columns spill in the finisher)
K_PREFILL += [dict(BT=64, BD=128, num_warps=w, KSPLIT=k) for k in (1024, 2048, 4096) for w in (4, 8)]
# hc_pre's collapse as a launch of its own (`_mhc.COLLAPSE_TILE`) at the default tile (hc_head ignores it)
APART = [dict(BT=16, BD=256, num_warps=4, APART=True)]
# hc_pre at prefill sizes: the collapse by BDT-column programs queued after the mix programs (TAIL, the default from
# 256 tokens: `_mhc.prefill_tiles`) at other K pieces, collapse widths and warps, and the finishing program's collapse
# instead (TAIL off)
TAIL = [dict(TAIL=True, BT=64, BD=128, num_warps=4, KSPLIT=k, BDT=b) for k in (2048, 4096) for b in (128, 256, 512)]
TAIL += [dict(TAIL=True, BT=64, num_warps=8, KSPLIT=2048, BDT=b) for b in (256, 512)]
TAIL += [dict(TAIL=False)]
# warps at the default tiles (`_mhc.config` picks them by launch size), and for hc_pre the finisher collapsing every
# column instead of the shared collapse (SHARE off: `hc_pre._collapse_share`)
WARPS = [dict(num_warps=w) for w in (2, 4, 8)]
UNSHARED = [dict(num_warps=w, SHARE=False) for w in (4, 8)]


def sweep(tri, bench, models, tokens, dev, ops=("hc_pre", "hc_head")):
    """Time hc_pre / hc_head (those of them in `ops`) per block configuration; every configuration's outputs must
    equal the default's."""
    from parity.optimized.ops.triton import _mhc

    rows, g = [], torch.Generator().manual_seed(1)
    for model in models:
        for t in tokens:
            inp = make_inputs(model, t, dev, g)
            for name in [op for op in ("hc_pre", "hc_head") if op in ops]:
                fn, _ = op_calls(name, tri, inp)
                _mhc.TUNING.clear()
                base = fn()
                base = base if isinstance(base, tuple) else (base,)
                pre_only = APART + UNSHARED + (TAIL if t >= 256 else []) if name == "hc_pre" else []
                prefill = K_PREFILL if t >= 256 else []
                for cfg in SWEEP + ([WHOLE_BLOCK] if t < 16 else []) + K_PIECES + prefill + WARPS + pre_only:
                    with _mhc.tuned(**cfg):
                        out = fn()
                        out = out if isinstance(out, tuple) else (out,)
                        same = all(torch.equal(a, b) for a, b in zip(out, base))
                        ms = graph_ms(fn, bench) if dev == "cuda" else bench(fn)  # decode tiles: by GPU time
                        btf = _mhc.config(t, inp["x4"].shape[-1], name)["BTF"]
                    rows.append(dict(op=name, model=model, tokens=t, **cfg, BTF_used=btf, ms=ms, same_bits=same))
                    print(f"sweep {name:8s} {model:5s} T={t:5d} {cfg}  {ms:8.4f} ms  bits "
                          f"{'same' if same else 'DIFFER'}", flush=True)  # fmt: skip
            del inp
    return rows


def markdown(rows, checks, info, sweep_rows=()) -> str:
    out = [f"# Triton mHC / norm / RoPE kernels on {info['device']}", "",
           f"torch {info['torch']}, triton {info['triton']}; copy bandwidth {info['copy_gbs']:.0f} GB/s", "",
           "triton ms: median per call, host launch overhead included; graph ms: 20 calls in one CUDA graph, per "
           "call (the GPU's own time).", "",
           "| op | model | T | triton ms | graph ms | torch ms | speed-up | MB | % of HBM roofline | % in graph |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r['op']} | {r['model']} | {r['tokens']} | {r['triton_ms']:.4f} | {r['graph_ms']:.4f} | "
                   f"{r['torch_ms']:.4f} | {r['speedup']:.1f}x | {r['mbytes']:.2f} | {r['pct_hbm']:.1f}% | "
                   f"{r['pct_hbm_graph']:.1f}% |")  # fmt: skip
    out += ["", "| op | model | T | claim | worst (excess / allowance) | result |", "|---|---|---:|---|---:|---|"]
    for c in checks:
        out.append(f"| {c['op']} | {c['model']} | {c['tokens']} | {c['claim']} | {c['worst']:.3g} | "
                   f"{'PASS' if c['passed'] else 'FAIL'} |")  # fmt: skip
    if sweep_rows:
        out += [
            "",
            "Sweep: graph ms per call on CUDA (as the table's graph ms); options not named keep the default.",
            "",
            "| op | model | T | BT | BD | finisher rows | K piece | warps | collapse | ms | bits as default |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
        ]
        for r in sweep_rows:
            collapse = "apart" if r.get("APART") else "finisher" if r.get("SHARE") is False else "default"
            out.append(f"| {r['op']} | {r['model']} | {r['tokens']} | {r.get('BT', 'default')} | "
                       f"{r.get('BD', 'default')} | {r['BTF_used']} | {r.get('KSPLIT', 'default')} | "
                       f"{r.get('num_warps', 'default')} | {collapse} | {r['ms']:.4f} | "
                       f"{'yes' if r['same_bits'] else 'NO'} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for triton_mhc.json and triton_mhc.md")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script in the Triton interpreter")
    parser.add_argument("--sweep-tokens", type=int, nargs="*", default=[64, 4096], help="block-size sweep sizes")
    opts = parser.parse_args()
    dev = opts.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench/triton_mhc.py needs a CUDA device (or --device cpu for a dry run)", file=sys.stderr)
        return 2
    tri = resolve_ops(OpsConfig(overrides=tuple((op, "triton") for op in OPS)))  # sets Triton up first
    ref = resolve_ops(OpsConfig())
    import triton
    from triton.testing import do_bench

    def bench(fn):
        if dev == "cpu":
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        return do_bench(fn, warmup=10, rep=40, return_mode="median")

    start = time.time()
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter dry run)"
    info = dict(device=name, torch=torch.__version__, triton=triton.__version__)
    bw = copy_bandwidth(bench, dev)
    info["copy_gbs"] = bw / 1e9
    print(f"{info['device']}: torch {info['torch']}, triton {info['triton']}, copy bandwidth {bw / 1e9:.0f} GB/s")
    rows, checks = [], []
    g = torch.Generator().manual_seed(0)
    for model in opts.models:
        for t in opts.tokens:
            inp = make_inputs(model, t, dev, g)
            args = (inp["x4"], inp["fn_pre"], inp["scale_pre"], inp["base_pre"], (0, t), EPS, HC, 20, EPS)
            _, inp["post"], inp["comb"] = ref.hc_pre(*args)
            for name in opts.ops:
                claim, worst = check(name, tri, ref, inp)
                ok = passed(claim, worst)
                checks.append(dict(op=name, model=model, tokens=t, claim=claim, worst=worst, passed=ok))
                fn_tri, nbytes = op_calls(name, tri, inp)
                fn_ref, _ = op_calls(name, ref, inp)
                ms_tri, ms_ref = bench(fn_tri), bench(fn_ref)
                ms_graph = graph_ms(fn_tri, bench) if dev == "cuda" else ms_tri
                pct = 100 * (nbytes / bw) / (ms_tri * 1e-3)
                row = dict(op=name, model=model, tokens=t, triton_ms=ms_tri, torch_ms=ms_ref, speedup=ms_ref / ms_tri,
                           mbytes=nbytes / 1e6, pct_hbm=pct, graph_ms=ms_graph,
                           pct_hbm_graph=100 * (nbytes / bw) / (ms_graph * 1e-3))  # fmt: skip
                rows.append(row)
                print(f"{name:9s} {model:5s} T={t:5d}  triton {ms_tri:8.4f} ms (graph {ms_graph:8.4f})  torch "
                      f"{ms_ref:8.4f} ms  "
                      f"{row['speedup']:6.1f}x  {pct:5.1f}% of HBM  check[{claim}] {worst:.3g} "
                      f"{'PASS' if ok else 'FAIL'}", flush=True)  # fmt: skip
            del inp
            if dev == "cuda":
                torch.cuda.empty_cache()
    sweep_rows = sweep(tri, bench, opts.models, opts.sweep_tokens, dev, opts.ops) if opts.sweep_tokens else []
    # the kernels claim the same bits for every tile (BT, BD, finisher rows, warps) and K piece
    for r in sweep_rows:
        checks.append(dict(op=r["op"] + " block sweep", model=r["model"], tokens=r["tokens"], claim="same bits",
                           worst=0.0 if r["same_bits"] else math.inf, passed=r["same_bits"]))  # fmt: skip
    info["seconds"] = time.time() - start
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "triton_mhc.json"), "w") as f:
        json.dump(dict(info=info, timings=rows, checks=checks, sweep=sweep_rows), f, indent=2, default=str)
    text = markdown(rows, checks, info, sweep_rows)
    with open(os.path.join(opts.out, "triton_mhc.md"), "w") as f:
        f.write(text)
    print(text)
    failed = [c for c in checks if not c["passed"]]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in {info['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

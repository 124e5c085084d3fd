"""Benchmark and GPU check of the GEMM-side Triton kernels: fp8_gemm, fp4_gemm, moe_experts, o_lora, moe_gate,
dense_linear, at DeepSeek-V4-Flash and -Pro shapes for T = 1, 8, 64, 512, 4096 tokens.

    python3 bench/triton_gemm.py --out DIR        # on the GPU, with the repository on PYTHONPATH (< 6 min on an H200)
    python3 bench/triton_gemm.py --compile-check  # anywhere (no GPU needed): every kernel x autotune config compiled
                                                  # for sm_90 (bench/sm90.py): wgmma use, registers, spills

Per case: median time of the Triton op (triton.testing.do_bench) and of the op's torch backend (the reference
kernels' exact emulation; timed once where it is slow, skipped where it would blow the time budget), and the case's
share of a roofline measured in the same run: device-to-device copy bandwidth (bytes read + written per second), FP8
`torch._scaled_mm` 8192^3 and bf16 / fp32 matmul 8192^3 rates. For o_lora the bf16 einsum "sgd,grd->sgr" is timed
too (the reference's own wo_a kernel); for dense_linear's fp32 case, the other forms of its fp32 dot (the op's is
tf32x3; ieee: exact products on the FMA units; bf16x6, bf16x3: split operands on the bf16 tensor cores), a row each,
with their max error against float64 in units of 2^-23 of the absolute term sum. Decode-sized cases (T <= 64; o_lora
up to 1024) are also timed replayed from a CUDA graph, cycling through enough weight copies that every launch
streams its weights from HBM rather than the 60 MB L2 (`graph_ms`): eager times of a 10-30 us kernel are mostly
Python launch overhead on this host (70-250 us). Targets checked (graph times where measured, the einsum timed the
same way): fp8_gemm >= 60 % of FP8 peak at M >= 2048 and >= 60 % of copy bandwidth on weight bytes at M <= 64;
fp4_gemm / moe_experts >= 50 % of copy bandwidth on the expert bytes touched at M <= 64; o_lora >= 1.5x the einsum
at M <= 64 and >= 1.0x at M = 1024.
Tile configurations were chosen with `bench/triton_gemm_sweep.py` (same graph timing, raw kernel per config).

Correctness on the bench shapes (a row subset where the torch backend is slow; rows are independent): each Triton
output against the torch backend with the op's tolerance (GEMMs: |triton - golden| <= |torch - golden| + the
accumulation allowance + 1 ulp, the test suite's criterion; moe_experts: row-normalized error; moe_gate: expert
agreement and weight error). Writes results.json and results.md to --out; exits 1 on a correctness failure.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.cuda_graph import captured
from bench.sm90 import compile_sm90

DEADLINE_S = float(os.environ.get("BENCH_DEADLINE_S", 330))  # stop starting new cases after this (s)
TOKENS = (1, 8, 64, 512, 4096)
VOCAB = 129280  # V4's vocabulary (the head's rows)
MODELS = {
    # dim, q_lora, heads, o_groups, experts, inter, index heads
    "flash": dict(D=4096, Q=1024, H=64, G=8, E=256, I=2048, IH=64, route_scale=1.5),
    "pro": dict(D=7168, Q=1536, H=128, G=16, E=384, I=3072, IH=64, route_scale=2.5),
}
MY_OPS = ("fp8_gemm", "fp4_gemm", "moe_experts", "o_lora", "moe_gate", "dense_linear")
# measured in this order (the deadline may cut the last ones): the targets first
ORDER = ("o_lora", "fp8_gemm", "moe_experts", "fp4_gemm", "dense_linear", "moe_gate")


# ---- timing and rooflines ---------------------------------------------------------------------------------------


def bench_ms(fn, rep=60):
    import triton

    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def once_ms(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t)


L2_ROTATE_BYTES = 256 << 20  # decode timing cycles through weight copies: several times the 60 MB L2


def copies_for(nbytes):
    """Weight copies that make one pass over them stream from HBM, not from L2."""
    return max(1, min(64, -(-L2_ROTATE_BYTES // max(1, nbytes))))


def _config_name(config) -> str:
    """A triton.Config as `BLOCK_W=64 w4 s3` (its constexprs, warps, stages)."""
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} w{config.num_warps} s{config.num_stages}"


def graph_ms(calls, launches=64):
    """Median ms per call of `calls` (closures, one per weight copy, cycled) replayed from one CUDA graph: the GPU's
    time without Python's launch overhead, as a serving engine that captures its decode step sees it."""
    for c in calls:  # compile and autotune outside the capture
        c()
    torch.cuda.synchronize()
    reps = max(1, launches // len(calls))
    g = captured(calls, reps)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (reps * len(calls)))
    return statistics.median(times)


_MOVE_FLOOR: dict = {}


def move_floor_ms(nbytes):
    """Graph time of one device copy that moves `nbytes` (reads half, writes half; copies rotated like the ops'
    weights): what the GPU's best-tuned memory kernel needs to move that many bytes in one launch, launch and ramp
    included. For the decode GEMMs over a few MB this, not the bandwidth, bounds what a kernel can reach (a torch
    reduction over the bytes was tried first: it reads at well under half the copy's rate, no floor)."""
    if nbytes not in _MOVE_FLOOR:
        half = max(1, nbytes // 2)
        new = lambda: torch.empty(half, dtype=torch.uint8, device="cuda")  # noqa: E731
        pairs = [(new(), new()) for _ in range(copies_for(nbytes))]
        _MOVE_FLOOR[nbytes] = graph_ms([lambda p=p: p[1].copy_(p[0]) for p in pairs])
        del pairs
    return _MOVE_FLOOR[nbytes]


def _copy_ms(nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return bench_ms(lambda: dst.copy_(src))


def measure_rooflines():
    dev = "cuda"
    copy_ms = _copy_ms(1 << 30)
    n = 8192
    a = torch.randn(n, n, device=dev).to(torch.bfloat16)
    b = torch.randn(n, n, device=dev).to(torch.bfloat16)
    bf16_ms = bench_ms(lambda: a @ b)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).T
    one = torch.ones((), device=dev)
    fp8_ms = bench_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    af, bf = a[:4096, :4096].float(), b[:4096, :4096].float()
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32_ms = bench_ms(lambda: af @ bf)
    return {
        "copy_bytes_per_s": 2 * (1 << 30) / (copy_ms * 1e-3),
        "bf16_flops": 2 * n**3 / (bf16_ms * 1e-3),
        "fp8_flops": 2 * n**3 / (fp8_ms * 1e-3),
        "fp32_flops": 2 * 4096**3 / (fp32_ms * 1e-3),
    }


# ---- inputs ---------------------------------------------------------------------------------------------------


def fp8_weight(n, k, dev="cuda"):
    w = (torch.randn(n, k, device=dev) * 16).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.randint(112, 118, ((n + 127) // 128, k // 128), dtype=torch.uint8, device=dev)
    return w, s.view(torch.float8_e8m0fnu)


def fp4_weight(n, k, dev="cuda"):
    w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev).view(torch.float4_e2m1fn_x2)
    s = torch.randint(117, 121, (n, k // 32), dtype=torch.uint8, device=dev).view(torch.float8_e8m0fnu)
    return w, s


def act(t, k, dev="cuda"):
    return torch.randn(t, k, device=dev).to(torch.bfloat16)


# ---- correctness criteria ---------------------------------------------------------------------------------------


def gemm_excess(got, want, golden, allowance):
    """Largest amount by which an element breaks |got - g| <= |want - g| + allowance + 1 ulp (<= 0: pass)."""
    g, a, b = golden.double(), want.double(), got.double()
    mag = g.abs().to(got.dtype)
    ulp = (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()
    return float(((b - g).abs() - (a - g).abs() - allowance - ulp).max())


def dequant_fp8(w, s):
    from parity.formats import dequantize_fp8_blocks

    return dequantize_fp8_blocks(w, s).double()


def dequant_fp4(w, s):
    from parity.formats import e8m0_to_float, fp4_to_float

    n = w.shape[0]
    return fp4_to_float(w.view(torch.uint8)).view(n, -1).double() * e8m0_to_float(s).double().repeat_interleave(32, -1)


# ---- the cases ----------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, roof, quick):
        from parity.optimized.ops import OpsConfig, registry, resolve_ops

        self.roof = roof
        self.quick = quick
        self.start = time.time()
        self.triton = resolve_ops(OpsConfig(overrides=tuple((op, "triton") for op in MY_OPS)))
        self.torch = {op: registry()[op]["torch"].load() for op in MY_OPS}
        self.rows = []
        self.failures = []

    def late(self):
        return time.time() - self.start > DEADLINE_S

    def record(
        self, op, model, t, shape, tri_ms, torch_ms, bytes_, flops, peak, weight_bytes=None, extra=None, check=None,
        graph=None,
    ):  # fmt: skip
        r = self.roof
        row = dict(op=op, model=model, T=t, shape=shape, triton_ms=round(tri_ms, 4))
        if graph is not None:  # decode: the same op replayed from a CUDA graph, weights from HBM
            row["graph_ms"] = round(graph, 4)
            row["pct_copy_bw_weights_graph"] = round(100 * weight_bytes / r["copy_bytes_per_s"] / (graph * 1e-3), 1)
            floor = move_floor_ms(weight_bytes)
            row["move_floor_ms"] = round(floor, 4)  # one device copy moving the same bytes, graph-timed
            row["pct_of_move_floor"] = round(100 * floor / graph, 1)
        row["torch_ms"] = None if torch_ms is None else round(torch_ms, 3)
        row["speedup_vs_torch"] = None if torch_ms is None else round(torch_ms / tri_ms, 1)
        ideal = max(bytes_ / r["copy_bytes_per_s"], flops / r[peak]) * 1e3
        row["pct_roofline"] = round(100 * ideal / tri_ms, 1)
        row["pct_peak"] = round(100 * flops / r[peak] / (tri_ms * 1e-3), 1)
        row["pct_copy_bw"] = round(100 * bytes_ / r["copy_bytes_per_s"] / (tri_ms * 1e-3), 1)
        if weight_bytes is not None:
            row["pct_copy_bw_weights"] = round(100 * weight_bytes / r["copy_bytes_per_s"] / (tri_ms * 1e-3), 1)
        row.update(extra or {})
        if check is not None:
            name, value, tol, ok = check
            row.update(check=name, err=value, tol=tol, ok=ok)
            if not ok:
                self.failures.append(f"{op} {model} T={t}: {name} {value} vs {tol}")
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def torch_time(self, fn, t, limit_t):
        """The torch backend's time: median of a few runs when cheap, one run when slow, None past `limit_t`."""
        if t > limit_t:
            return None
        first = once_ms(fn)
        if first > 200:
            return first
        return statistics.median([once_ms(fn) for _ in range(3)])

    # -- fp8_gemm -------------------------------------------------------------------------------------------------

    def fp8_gemm(self, model, cfg):
        from parity.optimized.ops.triton.fp8_gemm import fp8_linear
        from parity.reference import kernels

        weights = {
            "wq_a": (cfg["Q"], cfg["D"]),
            "wq_b": (cfg["H"] * 512, cfg["Q"]),
            "wo_b": (cfg["D"], cfg["G"] * 1024),
        }
        for name, (n, k) in weights.items():
            w, s = fp8_weight(n, k)
            copies = [(w, s)] + [fp8_weight(n, k) for _ in range(copies_for(n * k) - 1)]

            def one(t, name=name, n=n, k=k, w=w, s=s, copies=copies):
                x = act(t, k)
                xq, xs = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
                tri = lambda: self.triton.fp8_gemm(xq, xs, w, s, torch.float8_e8m0fnu)  # noqa: E731
                ms = bench_ms(tri)
                calls = [lambda c=c: self.triton.fp8_gemm(xq, xs, c[0], c[1], torch.float8_e8m0fnu) for c in copies]
                gms = graph_ms(calls) if t <= 64 else None
                fused_ms = bench_ms(lambda: fp8_linear(x, w, s))
                aq_ms = bench_ms(lambda: kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu))
                sub = min(t, 64)
                ref = lambda: self.torch["fp8_gemm"](xq[:sub], xs[:sub], w, s, torch.float8_e8m0fnu)  # noqa: E731
                torch_ms = self.torch_time(ref, t, 64) if t <= 64 else None
                got, want = tri()[:sub], ref()
                a = xq[:sub].double() * xs[:sub].float().double().repeat_interleave(128, -1)
                b = dequant_fp8(w, s)
                golden = a @ b.T
                allow = (a.abs() @ b.abs().T) * (2.0**-12 + (k // 128) * 2.0**-24)
                exc = gemm_excess(got, want, golden, allow)
                wbytes = n * k + s.numel()
                self.record(
                    "fp8_gemm", model, t, f"{name} N={n} K={k}", ms, torch_ms, wbytes + t * k * 2 + t * n * 2,
                    2 * t * n * k, "fp8_flops", weight_bytes=wbytes,
                    extra=dict(fused_act_quant_ms=round(fused_ms, 4), act_quant_plus_gemm_ms=round(ms + aq_ms, 4)),
                    check=("gemm excess over allowance", exc, 0.0, exc <= 0), graph=gms,
                )  # fmt: skip

            for t in TOKENS:
                if self.late():
                    return
                one(t)

    # -- fp4_gemm -------------------------------------------------------------------------------------------------

    def fp4_gemm(self, model, cfg):
        from parity.reference import kernels

        for name, (n, k) in {"expert w1": (cfg["I"], cfg["D"]), "expert w2": (cfg["D"], cfg["I"])}.items():
            w, s = fp4_weight(n, k)
            copies = [(w, s)] + [fp4_weight(n, k) for _ in range(copies_for(n * k // 2) - 1)]

            def one(t, name=name, n=n, k=k, w=w, s=s, copies=copies):
                x = act(t, k)
                xq, xs = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
                tri = lambda: self.triton.fp4_gemm(xq, xs, w, s, torch.float8_e8m0fnu)  # noqa: E731
                ms = bench_ms(tri)
                calls = [lambda c=c: self.triton.fp4_gemm(xq, xs, c[0], c[1], torch.float8_e8m0fnu) for c in copies]
                gms = graph_ms(calls) if t <= 64 else None
                sub = min(t, 64)
                ref = lambda: self.torch["fp4_gemm"](xq[:sub], xs[:sub], w, s, torch.float8_e8m0fnu)  # noqa: E731
                torch_ms = self.torch_time(ref, t, 64) if t <= 64 else None
                got, want = tri()[:sub], ref()
                a = xq[:sub].double() * xs[:sub].float().double().repeat_interleave(128, -1)
                b = dequant_fp4(w, s)
                allow = (a.abs() @ b.abs().T) * (2.0**-12 + (k // 32) * 2.0**-24)
                exc = gemm_excess(got, want, a @ b.T, allow)
                wbytes = n * k // 2 + s.numel()
                self.record(
                    "fp4_gemm", model, t, f"{name} N={n} K={k}", ms, torch_ms, wbytes + t * k + t * n * 2,
                    2 * t * n * k, "fp8_flops", weight_bytes=wbytes,
                    check=("gemm excess over allowance", exc, 0.0, exc <= 0), graph=gms,
                )  # fmt: skip

            for t in TOKENS:
                if self.late():
                    return
                one(t)

    # -- moe_experts ----------------------------------------------------------------------------------------------

    def moe_experts(self, model, cfg):
        from parity.optimized.ops.moe_experts import ExpertWeights
        from parity.optimized.ops.triton import moe_experts as tm
        from parity.optimized.ops.triton.moe_experts import split_plan

        d, inter, n_exp = cfg["D"], cfg["I"], cfg["E"]
        experts = [
            ExpertWeights(fp4_weight(inter, d), fp4_weight(d, inter), fp4_weight(inter, d), 10.0) for _ in range(n_exp)
        ]
        shared = ExpertWeights(fp8_weight(inter, d), fp8_weight(d, inter), fp8_weight(inter, d), 10.0)
        per_expert = 3 * (inter * d // 2 + inter * d // 32)
        shared_bytes = 3 * (inter * d + (inter // 128) * (d // 128))

        def one(t):
            x = act(t, d) * 0.5
            routes = [
                (torch.rand(t, n_exp, device="cuda").topk(6, dim=-1).indices,
                 torch.rand(t, 6, device="cuda", dtype=torch.float32) * cfg["route_scale"] / 3)
                for _ in range(4)
            ]  # fmt: skip
            indices, weights = routes[0]
            args = (experts, shared, "ue8m0", torch.float8_e8m0fnu)
            tri = lambda: self.triton.moe_experts(x, weights, indices, *args)  # noqa: E731
            ms = bench_ms(tri, rep=40)
            # the configs the autotuner chose for this call's launches (the last key each tuner ran)
            chosen = {
                f"{n}_config": _config_name(k.best_config) for n, k in (("gate_up", tm._gate_up), ("down", tm._down))
            }
            # graph: 4 routings in turn (other experts each time, so their weights come from HBM)
            calls = [lambda r=r: self.triton.moe_experts(x, r[1], r[0], *args) for r in routes]
            gms = graph_ms(calls, launches=16) if t <= 64 else None
            sub = min(t, 16)
            ref = lambda: self.torch["moe_experts"](x[:sub], weights[:sub], indices[:sub], *args)  # noqa: E731
            torch_ms = self.torch_time(lambda: self.torch["moe_experts"](x, weights, indices, *args), t, 1)
            got, want = tri()[:sub].double(), ref().double()
            err = float(((got - want).abs().amax(-1) / want.abs().amax(-1).clamp(min=1e-30)).max())
            touched = int(indices.unique().numel())
            wbytes = touched * per_expert + shared_bytes
            flops = 2 * 3 * d * inter * (t * 6 + t)
            extra = dict(chosen)
            if t * 7 <= 64:  # decode sizes: the call with both launches split and with neither (graph ms)
                # beside the op's own choice (`split_plan`), bits compared (the op promises the same)
                extra["op_splits"] = split_plan(t * 7, d)
                same = True
                for name, forced in (("split", True), ("unsplit", False)):
                    other = [lambda r=r, f=forced: self.triton.moe_experts(x, r[1], r[0], *args, _split=f)
                             for r in routes]  # fmt: skip
                    extra[f"graph_ms_{name}"] = round(graph_ms(other, launches=16), 4)
                    same = same and bool(torch.equal(tri(), other[0]()))
                extra["split_bits_equal"] = same
                ok_split = same
            else:
                ok_split = True
            self.record(
                "moe_experts", model, t, f"E={n_exp} top6 D={d} I={inter} ({touched} experts touched)", ms, torch_ms,
                wbytes + t * d * 4, flops, "fp8_flops", weight_bytes=wbytes, extra=extra,
                check=("max row-normalized |diff| (first 16 tokens), split bits", err, 2.0**-4,
                       err <= 2.0**-4 and ok_split), graph=gms,
            )  # fmt: skip

        for t in TOKENS:
            if self.late():
                return
            one(t)

    # -- o_lora -----------------------------------------------------------------------------------------------------

    def o_lora(self, model, cfg):
        from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks

        g, rank, kg = cfg["G"], 1024, cfg["H"] * 512 // cfg["G"]

        def checkpoint_made():  # a wo_a as the model holds it: FP8 blocks dequantized exactly to bf16
            q, s = quantize_fp8_blocks(torch.randn(g * rank, kg, device="cuda", dtype=torch.float32) * kg**-0.5)
            return dequantize_fp8_blocks(q, s).to(torch.bfloat16), s

        wo_a, s = checkpoint_made()
        copies = [wo_a] + [checkpoint_made()[0] for _ in range(copies_for(g * rank * kg) - 1)]

        def one(t):
            o = act(t, g * kg)
            tri = lambda: self.triton.o_lora(o, wo_a, g, rank, (0, t))  # noqa: E731
            ms = bench_ms(tri)
            w3 = wo_a.view(g, rank, kg)
            ein = lambda: torch.einsum("sgd,grd->sgr", o.view(t, g, kg), w3)  # noqa: E731
            ein_ms = bench_ms(ein)
            gms = ein_gms = None
            if t <= 1024:
                gms = graph_ms([lambda w=w: self.triton.o_lora(o, w, g, rank, (0, t)) for w in copies])
                ein_gms = graph_ms(
                    [lambda w=w: torch.einsum("sgd,grd->sgr", o.view(t, g, kg), w.view(g, rank, kg)) for w in copies]
                )
            torch_ms = bench_ms(lambda: self.torch["o_lora"](o, wo_a, g, rank, (0, t)))
            sub = min(t, 64)
            got, want = tri()[:sub], ein()[:sub]
            od, wd = o[:sub].double().view(sub, g, kg), w3.double()
            golden = torch.einsum("sgd,grd->sgr", od, wd)
            allow = torch.einsum("sgd,grd->sgr", od.abs(), wd.abs()) * (kg * 2.0**-23)
            exc = gemm_excess(got, want, golden, allow)
            wbytes = g * rank * kg + s.numel()
            self.record(
                "o_lora", model, t, f"G={g} K={kg} N={rank}", ms, torch_ms, wbytes + t * g * kg * 2 + t * g * rank * 2,
                2 * t * g * rank * kg, "bf16_flops", weight_bytes=wbytes,
                extra=dict(
                    einsum_ms=round(ein_ms, 4), speedup_vs_einsum=round(ein_ms / ms, 2),
                    einsum_graph_ms=None if ein_gms is None else round(ein_gms, 4),
                    speedup_vs_einsum_graph=None if gms is None else round(ein_gms / gms, 2),
                ),
                check=("gemm excess over allowance", exc, 0.0, exc <= 0), graph=gms,
            )  # fmt: skip

        for t in sorted({*TOKENS[:3], 512, 1024, 4096}):
            if self.late():
                return
            one(t)

    # -- moe_gate -------------------------------------------------------------------------------------------------

    def moe_gate(self, model, cfg):
        from parity.reference.model import route

        d, n_exp = cfg["D"], cfg["E"]
        weight = (torch.randn(n_exp, d, device="cuda") * d**-0.5).to(torch.bfloat16)
        bias = torch.randn(n_exp, device="cuda") * 0.1

        def one(t):
            x = act(t, d)
            ids = torch.randint(0, 1000, (t,), device="cuda")
            args = (weight, bias, None, ids, 6, "sqrtsoftplus", cfg["route_scale"])
            tri = lambda: self.triton.moe_gate(x, *args, (0, t))  # noqa: E731
            ms = bench_ms(tri)
            torch_ms = bench_ms(lambda: self.torch["moe_gate"](x, *args, (0, t)))
            per_token = tuple(range(t + 1)) if t <= 64 else None  # decode batches: one request per token
            seg_ms = bench_ms(lambda: self.torch["moe_gate"](x, *args, per_token)) if per_token else None
            (gw, gi), (rw, ri) = tri(), route(x, weight, bias, None, ids, 6, "sqrtsoftplus", cfg["route_scale"])
            agree = float((gi == ri).all(-1).float().mean())
            same = (gi == ri).all(-1)
            werr = float((gw[same] - rw[same]).abs().max()) if bool(same.any()) else 0.0
            ok = agree >= 0.99 and werr <= 1e-5
            self.record(
                "moe_gate", model, t, f"E={n_exp} D={d} top6", ms, torch_ms, n_exp * d * 2 + t * d * 2,
                2 * t * n_exp * d, "bf16_flops", weight_bytes=n_exp * d * 2,
                extra=dict(torch_one_request_per_token_ms=None if seg_ms is None else round(seg_ms, 3)),
                check=("expert agreement / max weight diff", [agree, werr], [0.99, 1e-5], ok),
            )  # fmt: skip

        for t in TOKENS:
            if self.late():
                return
            one(t)

    # -- dense_linear ---------------------------------------------------------------------------------------------

    def dense_linear(self, model, cfg):
        from parity.optimized.ops.triton.dense_linear import FP32_FORM, PRECISIONS, linear

        d = cfg["D"]
        # (N, dtype, largest T): the head's fp32 logits GEMM (vocab 129280 rows: 2.1 / 3.7 GB of fp32 weights) runs on
        # the sampled rows only, decode-sized
        cases = {
            "compressor wkv fp32": (1024, torch.float32, TOKENS[-1]),
            "indexer weights_proj bf16": (cfg["IH"], torch.bfloat16, TOKENS[-1]),
            "head fp32": (VOCAB, torch.float32, 64),
        }
        for name, (n, dtype, t_max) in cases.items():
            w = (torch.randn(n, d, device="cuda") * d**-0.5).to(dtype)
            es = w.element_size()
            copies = [w] + [w.clone() for _ in range(copies_for(n * d * es) - 1)]

            def one(t, name=name, n=n, dtype=dtype, w=w, copies=copies, es=es):
                x = torch.randn(t, d, device="cuda").to(dtype)
                tri = lambda: self.triton.dense_linear(x, w, (0, t))  # noqa: E731
                ms = bench_ms(tri)
                torch_ms = bench_ms(lambda: self.torch["dense_linear"](x, w, (0, t)))
                # decode sizes: also replayed from a CUDA graph over weight copies (streamed from HBM)
                small = t <= 64
                calls = [lambda c=c: self.triton.dense_linear(x, c, (0, t)) for c in copies]
                graph = graph_ms(calls) if small else None
                sub = min(t, 64)
                got, want = tri()[:sub], self.torch["dense_linear"](x[:sub], w, (0, sub))
                xd, wd = x[:sub].double(), w.double()
                golden, absum = xd @ wd.T, xd.abs() @ wd.abs().T
                exc = gemm_excess(got, want, golden, absum * (d * 2.0**-23))
                peak = "fp32_flops" if dtype == torch.float32 else "bf16_flops"
                self.record(
                    "dense_linear", model, t, f"{name} N={n} K={d}", ms, torch_ms, n * d * es + t * (d + n) * es,
                    2 * t * n * d, peak, weight_bytes=n * d * es, graph=graph,
                    check=("gemm excess over allowance", exc, 0.0, exc <= 0),
                )  # fmt: skip
                if dtype != torch.float32:
                    return
                # the other forms of the fp32 dot (the op's is tf32x3): ieee (exact products, FMA units), bf16x6 /
                # bf16x3 (split operands on the bf16 tensor cores; dense_linear.linear says what each drops), a row
                # each; the error is reported in units of 2^-23 of each output's absolute term sum (the op's bound is
                # K + 16 such units)
                for prec in (p for p in PRECISIONS if p != FP32_FORM):
                    if self.late():
                        return
                    cand = lambda prec=prec: linear(x, w, _precision=prec)  # noqa: E731
                    units = ((cand()[:sub].double() - golden).abs() / (absum * 2.0**-23)).max().item()
                    calls = [lambda c=c, prec=prec: linear(x, c, _precision=prec) for c in copies]
                    graph = graph_ms(calls) if small else None
                    self.record(
                        "dense_linear", model, t, f"{name} {prec} form N={n} K={d}", bench_ms(cand), torch_ms,
                        n * d * es + t * (d + n) * es, 2 * t * n * d, peak, weight_bytes=n * d * es, graph=graph,
                        check=("max error / (2^-23 abs term sum); the op's bound: K + 16", units, float(d + 16), True),
                    )  # fmt: skip

            for t in TOKENS:
                if self.late():
                    return
                if t <= t_max:
                    one(t)
            del w, copies


def targets(rows):
    """Which of the issue's performance targets the measurements meet: decode-sized cases by their CUDA-graph times
    (weights streamed from HBM; both sides of a comparison timed the same way), the others by eager times."""
    out = []
    for r in rows:
        t, op = r["T"], r["op"]
        bw = r.get("pct_copy_bw_weights_graph", r.get("pct_copy_bw_weights"))
        if op == "fp8_gemm" and t >= 2048:
            out.append((r, "fp8_gemm M>=2048: >= 60 % of FP8 peak", r["pct_peak"] >= 60))
        if op == "fp8_gemm" and t <= 64:
            out.append((r, f"fp8_gemm M<=64: >= 60 % of copy bandwidth on weight bytes (graph: {bw} %)", bw >= 60))
        if op in ("fp4_gemm", "moe_experts") and t <= 64:
            out.append((r, f"{op} M<=64: >= 50 % of copy bandwidth on expert bytes (graph: {bw} %)", bw >= 50))
        x = r.get("speedup_vs_einsum_graph") or r.get("speedup_vs_einsum")
        if op == "o_lora" and t <= 64:
            out.append((r, f"o_lora M<=64: >= 1.5x the bf16 einsum (graph: {x}x)", x >= 1.5))
        if op == "o_lora" and t == 1024:
            out.append((r, f"o_lora M=1024: >= 1.0x the bf16 einsum (graph: {x}x)", x >= 1.0))
    return out


def markdown(roof, rows, tgt, failures):
    lines = [
        "# GEMM-side Triton kernels on " + torch.cuda.get_device_name(),
        "",
        f"Measured rooflines: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), FP8 _scaled_mm "
        f"{roof['fp8_flops'] / 1e12:.0f} TFLOP/s, bf16 {roof['bf16_flops'] / 1e12:.0f} TFLOP/s, fp32 "
        f"{roof['fp32_flops'] / 1e12:.1f} TFLOP/s.",
        "",
        "| op | model | T | shape | triton ms | graph ms | torch ms | x torch | % roofline | % peak | "
        "% copy BW (weights) | graph % copy BW (weights) | extra | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skip = {"op", "model", "T", "shape", "triton_ms", "torch_ms", "speedup_vs_torch", "pct_roofline", "pct_peak"}
    skip |= {"pct_copy_bw", "pct_copy_bw_weights", "check", "err", "tol", "ok", "graph_ms", "pct_copy_bw_weights_graph"}
    for r in rows:
        extra = ", ".join(f"{k}={v}" for k, v in r.items() if k not in skip)
        check = f"{'ok' if r.get('ok') else 'FAIL'} ({r.get('err')} vs {r.get('tol')})"
        lines.append(
            f"| {r['op']} | {r['model']} | {r['T']} | {r['shape']} | {r['triton_ms']} | {r.get('graph_ms')} | "
            f"{r['torch_ms']} | {r['speedup_vs_torch']} | {r['pct_roofline']} | {r['pct_peak']} | "
            f"{r.get('pct_copy_bw_weights')} | {r.get('pct_copy_bw_weights_graph')} | {extra} | {check} |"
        )
    lines += ["", "## Targets", ""]
    for r, name, met in tgt:
        lines.append(f"- {'MET' if met else 'missed'}: {name} ({r['model']} T={r['T']} {r['shape']})")
    lines += ["", "## Correctness", "", "all checks passed" if not failures else "\n".join("- " + f for f in failures)]
    return "\n".join(lines) + "\n"


# ---- compile check (no GPU needed) ------------------------------------------------------------------------------


def compile_check(only: str = "") -> int:
    """Compile every kernel with every autotune config for sm_90 (what the runtime JIT would build on an H100/H200,
    with its 16-byte alignment specialization), or those whose name contains `only`; print wgmma use, registers,
    stack (spills), shared memory and the loops' synchronous loads. Returns the exit status: 1 if any failed to
    compile, 2 if `only` names none."""
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # noqa: F401  (first: parity's triton package chooses the interpreter where no GPU was seen)

    from parity.optimized.ops.triton import (
        _gemm_common,
        dense_linear,
        fp4_gemm,
        fp8_gemm,
        moe_experts,
        moe_gate,
        o_lora,
    )

    aligned = {"N", "K", "N_KB", "R", "KG", "D", "INTER", "E"}

    def one(fn, sig, consts, nw, ns):
        divisible = {n for n, t in sig.items() if t.startswith("*") or n.startswith("stride") or n in aligned}
        return compile_sm90(fn, sig, consts, nw, ns, divisible)

    def cfgs(tuner, **constexprs):
        # the configs a launch with these constexprs may try (the tuner's `early_config_prune`, where it has one)
        kept = (
            tuner.configs
            if tuner.early_config_prune is None
            else tuner.early_config_prune(tuner.configs, {}, **constexprs)
        )
        return [(c.kwargs, c.num_warps, c.num_stages) for c in kept]

    i32 = "i32"
    jobs = []
    g8 = dict(a_ptr="*fp8e4nv", as_ptr="*u8", b_ptr="*fp8e4nv", bs_ptr="*u8", c_ptr="*bf16", ws_ptr="*fp32",
              cnt_ptr="*i32", M=i32, N=i32, K=i32, N_KB=i32, CHUNK_KB=i32, M_BUCKET=i32, stride_am=i32,
              stride_asm=i32, stride_bn=i32, stride_bsn=i32, stride_cm=i32)  # fmt: skip
    for mod, fn, sig in (
        (fp8_gemm, fp8_gemm._fp8_gemm_kernel, g8),
        (fp4_gemm, fp4_gemm._fp4_gemm_kernel, dict(g8, b_ptr="*u8")),
    ):
        name = mod.__name__.rsplit(".", 1)[1]
        for tuner, split, in_launch in (
            (mod._small, True, True), (mod._small, True, False), (mod._small, False, False), (mod._large, False, False)
        ):  # fmt: skip
            for chunked in (True, False):
                for kw, nw, ns in cfgs(tuner):
                    c = dict(A_E8M0=True, B_E8M0=True, CHUNKED=chunked, SPLIT=split, IN_LAUNCH=in_launch, DOT_F64=False)
                    c.update(kw)
                    if mod is fp8_gemm:
                        large = tuner is mod._large  # prefill: token tiles fastest, operands by TMA
                        c.update(FUSE_QUANT=False, T_FAST=large, TMA=large and not split)
                    else:
                        c.update(SUB=4, POW2=True, X_NATURAL=tuner is mod._small)  # decode (K <= 4096): K order
                    jobs.append((name, fn, sig, c, nw, ns))
    kw, nw, ns = cfgs(fp8_gemm._small)[0]
    c = dict(A_E8M0=False, B_E8M0=True, FUSE_QUANT=True, CHUNKED=True, SPLIT=False, IN_LAUNCH=False, DOT_F64=False)
    c.update(T_FAST=False, TMA=False, **kw)
    jobs.append(
        ("fp8_linear (fused act_quant)", fp8_gemm._fp8_gemm_kernel, dict(g8, a_ptr="*bf16", as_ptr="*bf16"), c, nw, ns)
    )
    so = dict(o_ptr="*bf16", w_ptr="*fp8e4nv", s_ptr="*u8", out_ptr="*bf16", T=i32, R=i32, KG=i32, M_BUCKET=i32,
              stride_ot=i32, stride_wr=i32, stride_sr=i32, stride_outt=i32)  # fmt: skip
    # decode tiles read the FP8 weight (one scale per tile when rank is a multiple of 128, per row otherwise),
    # prefill tiles the bf16 one (o_lora's launch)
    for small, fp8, w_type in ((True, True, "*fp8e4nv"), (False, False, "*bf16")):
        for r_aligned in (True, False) if fp8 else (True,):
            for kw, nw, ns in [(c.kwargs, c.num_warps, c.num_stages) for c in o_lora._configs(small)]:
                c = dict(W_FP8=fp8, BITS=fp8, EVEN_K=True, DOT_F64=False, R_ALIGNED=r_aligned, **kw)
                jobs.append(("o_lora", o_lora._o_lora_kernel, dict(so, w_ptr=w_type), c, nw, ns))
    sd = dict(x_ptr="*fp32", w_ptr="*fp32", y_ptr="*fp32", ws_ptr="*fp32", cnt_ptr="*i32", M=i32, N=i32, K=i32,
              CHUNK_K=i32, M_BUCKET=i32, stride_xm=i32, stride_wn=i32, stride_ym=i32)  # fmt: skip
    # split launches of decode batches reduce in the launch (the last program of each output tile)
    for tuner, split in ((dense_linear._small, True), (dense_linear._large, False)):
        # every fp32 form (the op's tf32x3 and the benchmark's) and bf16
        for dt, prec in [(f"fp32 {p}", p) for p in dense_linear.PRECISIONS] + [("bf16", "")]:
            s = dict(sd, x_ptr=f"*{dt[:4]}", w_ptr=f"*{dt[:4]}", y_ptr=f"*{dt[:4]}")
            for kw, nw, ns in cfgs(tuner):
                c = dict(SPLIT=split, IN_LAUNCH=split, PRECISION=prec, DOT_F64=False, **kw)
                jobs.append((f"dense_linear {dt}", dense_linear._linear_kernel, s, c, nw, ns))
    sg = dict(xq_ptr="*fp8e4nv", xqp_ptr="*fp8e4nv", xs_ptr="*fp32", plan_ptr="*i32", row_tok_ptr="*i32",
              row_w_ptr="*fp32", h_ptr="*bf16", w1_ptr="*u8", w3_ptr="*u8", s1_ptr="*u8", s3_ptr="*u8", off_ptr="*i64",
              sw1_ptr="*fp8e4nv", sw3_ptr="*fp8e4nv", ss1_ptr="*u8", ss3_ptr="*u8", N_PLAN=i32, E=i32, D=i32,
              INTER=i32, stride_xq=i32, stride_xs=i32, stride_h=i32, stride_w=i32, stride_s=i32, stride_sw=i32,
              stride_ss=i32, LIMIT="fp32", SHARED_LIMIT="fp32")  # fmt: skip
    sn = dict(hq_ptr="*fp8e4nv", hqp_ptr="*fp8e4nv", hs_ptr="*fp32", plan_ptr="*i32", out_ptr="*bf16", w2_ptr="*u8",
              s2_ptr="*u8", off_ptr="*i64", sw2_ptr="*fp8e4nv", ss2_ptr="*u8", N_PLAN=i32, E=i32, D=i32, INTER=i32,
              stride_hq=i32, stride_hs=i32, stride_out=i32, stride_w=i32, stride_s=i32, stride_sw=i32,
              stride_ss=i32)  # fmt: skip
    split_sig = dict(ws_ptr="*fp32", cnt_ptr="*i32", CHUNK=i32, WS_ROWS=i32)
    for fp4 in (True, False):
        w = "*u8" if fp4 else "*fp8e4nv"
        # decode launches (16-token tiles) split K, larger ones do not
        for bt, split in ((16, True), (16, False), (32, False)):
            for tuner, fn, sig in ((moe_experts._gate_up, moe_experts._gate_up_kernel, dict(sg, w1_ptr=w, w3_ptr=w)),
                                   (moe_experts._down, moe_experts._down_kernel, dict(sn, w2_ptr=w))):  # fmt: skip
                for kw, nw, ns in cfgs(tuner, BLOCK_T=bt):
                    c = dict(ROUTED_FP4=fp4, W_E8M0=True, SH_E8M0=True, ACT_POW2=True, DOT_F64=False, ALIGNED=True,
                             SPLIT=split, BLOCK_T=bt, **kw)  # fmt: skip
                    jobs.append((f"moe {fn.__name__} {'fp4' if fp4 else 'fp8'}", fn, dict(sig, **split_sig), c, nw, ns))
    jobs.append(("moe combine", moe_experts._combine_kernel, dict(y_ptr="*bf16", pos_ptr="*i32", out_ptr="*bf16", T=i32,
                 D=i32, R=i32), dict(TOPK=6, BLOCK_T=16, BLOCK_D=256), 4, 1))  # fmt: skip
    sp = dict(idx_ptr="*i64", w_ptr="*fp32", plan_ptr="*i32", row_tok_ptr="*i32", row_w_ptr="*fp32", pos_ptr="*i32",
              inv_ptr="*i32", sorted_e_ptr="*i32", first_ptr="*i32", last_ptr="*i32", T=i32, R=i32, E=i32,
              N_ROUTED=i32, N_PLAN=i32)  # fmt: skip
    for t, e in ((1, 256), (64, 256), (64, 384), (170, 1024)):  # decode sizes up to the one-launch plan's limits
        c = moe_experts.plan_constants(t, 6, e, 16)
        jobs.append((f"moe plan T {t} E {e}", moe_experts._plan_kernel, sp, c, 4, 1))
    sr = dict(s_ptr="*fp32", bias_ptr="*fp32", tid_ptr="*i32", ids_ptr="*i64", w_ptr="*fp32", i_ptr="*i64", T=i32,
              E=i32, stride_s=i32, ROUTE_SCALE="fp32")  # fmt: skip
    for func in (0, 1, 2):
        c = dict(TOPK=6, KPAD=8, FUNC=func, HAS_BIAS=True, HASH=False, BLOCK_T=8, BLOCK_E=512)
        jobs.append(("moe_gate route", moe_gate._route_kernel, sr, c, 4, 1))
    jobs.append(("split-K reduction", _gemm_common._reduce_chunks_kernel, dict(ws_ptr="*fp32", c_ptr="*bf16",
                 numel=i32), dict(N_CHUNKS=8, BLOCK=1024), 4, 1))  # fmt: skip
    chosen = [job for job in jobs if only in job[0]]
    if not chosen:
        print(f"--compile-check: no kernel's name contains {only!r} (e.g. 'fp8_gemm', 'moe')")
        return 2
    bad = 0
    for name, fn, sig, consts, nw, ns in chosen:
        shown = {k: v for k, v in consts.items() if k.startswith(("BLOCK", "SPLIT", "CHUNKED", "W_FP8"))}
        shown.pop("PRECISION", None)  # dense_linear's fp32 form: in the job's name
        try:
            r = one(fn, sig, consts, nw, ns)
            flag = "" if r["stack_bytes"] == 0 else "  <- spills"
            print(f"{name:34s} {shown} warps={nw} stages={ns}: {r}{flag}", flush=True)
        except Exception as e:  # a kernel that does not compile for sm_90 is what this check is for
            bad += 1
            print(f"{name:34s} {shown} warps={nw} stages={ns}: FAILED {type(e).__name__}: {str(e)[-600:]}", flush=True)
    print(f"compile check: {len(chosen)} kernel configs, {bad} failed")
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    p.add_argument("--ops", default=",".join(MY_OPS), help="comma-separated subset of the ops")
    p.add_argument("--models", default="flash,pro")
    p.add_argument("--quick", action="store_true", help="fewer token counts (1, 64, 4096)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (instead of the default or --quick)")
    p.add_argument("--compile-check", nargs="?", const="", default=None, metavar="NAME",
                   help="compile the kernels for sm_90 on this machine (no GPU needed) and exit")  # fmt: skip
    args = p.parse_args()
    if args.compile_check is not None:
        sys.exit(compile_check(args.compile_check))
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        sys.exit("bench/triton_gemm.py needs a CUDA device (use --compile-check to compile without one)")
    global TOKENS
    if args.quick:
        TOKENS = (1, 64, 4096)
    if args.tokens:
        TOKENS = tuple(int(t) for t in args.tokens.split(","))
    torch.manual_seed(0)
    roof = measure_rooflines()
    print(json.dumps({k: f"{v:.4g}" for k, v in roof.items()}), flush=True)
    b = Bench(roof, args.quick)
    ops = [op for op in ORDER if op in args.ops.split(",")]
    for op in ops:
        for model in args.models.split(","):
            # the GEMM ops return torch's default dtype: bf16, as in the model (fp32 would add a cast kernel)
            torch.set_default_dtype(torch.bfloat16 if op in ("fp8_gemm", "fp4_gemm") else torch.float32)
            try:
                getattr(b, op)(model, MODELS[model])
            except Exception as e:  # keep measuring the other ops; the failure is reported and fails the run
                b.failures.append(f"{op} {model}: {type(e).__name__}: {e}")
                print(f"{op} {model}: FAILED {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
    tgt = targets(b.rows)
    skipped = time.time() - b.start > DEADLINE_S
    result = dict(roofline=roof, rows=b.rows, targets=[(r["op"], r["model"], r["T"], n, m) for r, n, m in tgt])
    result.update(failures=b.failures, stopped_at_deadline=skipped, seconds=round(time.time() - b.start, 1))
    md = markdown(roof, b.rows, tgt, b.failures)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(md)
    sys.exit(1 if b.failures else 0)


if __name__ == "__main__":
    main()

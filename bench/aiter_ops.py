"""Benchmark and GPU check of the aiter backend's ops (AMD aiter's Triton kernels run on the NVIDIA GPU through
parity/optimized/ops/aiter/loader.py) beside the triton and torch backends, at the shapes of bench/triton_gemm.py:
fp8_gemm (wq_a, wq_b, wo_b of V4-Flash and -Pro, T = 1, 8, 64, 512, 4096) and o_lora (wo_a, T = 1, 8, 64, 512,
1024, 4096).

    PARITY_AITER_PATH=DIR python3 bench/aiter_ops.py --out OUT   # on the GPU, the repository on PYTHONPATH

DIR holds the aiter package (bench/make_aiter_folder.py extracts its Triton part from the wheel: the GPU box has no
network). Per case: median times (triton.testing.do_bench) of the aiter op, the triton op, and for o_lora the bf16
einsum (the reference's wo_a kernel); fp8_gemm's torch backend (exact emulation) only at T <= 64.

Correctness on the bench shapes (first 64 rows): fp8_gemm aiter against the float64 block math with the test
suite's criterion (|aiter - golden| <= |torch - golden| + 2^-12 MMA + fp32 accumulation allowance + 1 ulp);
o_lora aiter against its own FP8 math replayed with exact sums (aiter/o_lora.py `reference_math`: fp32
accumulation allowance + 1 ulp; an activation code flipped by the GPU's approximate reciprocal would show here),
and the scale collapse measured: cos and max error against the bf16 einsum, next to the triton backend's. Writes
results.json and results.md to --out; exits 1 on a correctness failure.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_gemm as tg  # noqa: E402  (same shapes, inputs, rooflines and criteria)

DEADLINE_S = 300


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


class AiterBench:
    def __init__(self, roof):
        from parity.optimized.ops import OpsConfig, registry, resolve_ops

        self.roof = roof
        self.start = time.time()
        ops = (("fp8_gemm", "aiter"), ("o_lora", "aiter"))
        self.aiter = resolve_ops(OpsConfig(overrides=ops))
        self.triton = resolve_ops(OpsConfig(overrides=tuple((op, "triton") for op, _ in ops)))
        self.torch = {op: registry()[op]["torch"].load() for op, _ in ops}
        self.rows, self.failures = [], []

    def late(self):
        return time.time() - self.start > DEADLINE_S

    def record(self, op, model, t, shape, aiter_ms, triton_ms, bytes_, flops, peak, extra, check):
        r = self.roof
        ideal = max(bytes_ / r["copy_bytes_per_s"], flops / r[peak]) * 1e3
        row = dict(op=op, model=model, T=t, shape=shape, aiter_ms=round(aiter_ms, 4), triton_ms=round(triton_ms, 4))
        row["aiter_vs_triton"] = round(triton_ms / aiter_ms, 2)
        row["pct_roofline"] = round(100 * ideal / aiter_ms, 1)
        row.update(extra)
        name, value, tol, ok = check
        row.update(check=name, err=value, tol=tol, ok=ok)
        if not ok:
            self.failures.append(f"{op} {model} T={t} {shape}: {name} {value} vs {tol}")
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def fp8_gemm(self, model, cfg):
        weights = {
            "wq_a": (cfg["Q"], cfg["D"]),
            "wq_b": (cfg["H"] * 512, cfg["Q"]),
            "wo_b": (cfg["D"], cfg["G"] * 1024),
        }
        for name, (n, k) in weights.items():
            w, s = tg.fp8_weight(n, k)
            for t in tg.TOKENS:
                if self.late():
                    return
                self._fp8_case(model, f"{name} N={n} K={k}", w, s, t)

    def _fp8_case(self, model, shape, w, s, t):
        from parity.reference import kernels

        n, k = w.shape
        xq, xs = kernels.act_quant(tg.act(t, k), 128, "ue8m0", torch.float8_e8m0fnu)
        run = {
            "aiter": lambda: self.aiter.fp8_gemm(xq, xs, w, s, torch.float8_e8m0fnu),
            "triton": lambda: self.triton.fp8_gemm(xq, xs, w, s, torch.float8_e8m0fnu),
        }
        ms = {b: tg.bench_ms(f) for b, f in run.items()}
        sub = min(t, 64)
        want = self.torch["fp8_gemm"](xq[:sub], xs[:sub], w, s, torch.float8_e8m0fnu)
        emulate = lambda: self.torch["fp8_gemm"](xq, xs, w, s, torch.float8_e8m0fnu)  # noqa: E731
        torch_ms = tg.once_ms(emulate) if t <= 64 else None  # the exact emulation: slow, timed once
        a = xq[:sub].double() * xs[:sub].float().double().repeat_interleave(128, -1)
        b = tg.dequant_fp8(w, s)
        allow = (a.abs() @ b.abs().T) * (2.0**-12 + 128 * 2.0**-24 + (k // 128) * 2.0**-24)
        exc = tg.gemm_excess(run["aiter"]()[:sub], want, a @ b.T, allow)
        wbytes = n * k + s.numel()
        self.record(
            "fp8_gemm", model, t, shape, ms["aiter"], ms["triton"], wbytes + t * k + t * n * 2, 2 * t * n * k,
            "fp8_flops", dict(torch_ms=None if torch_ms is None else round(torch_ms, 3)),
            ("gemm excess over allowance", exc, 0.0, exc <= 0),
        )  # fmt: skip

    def o_lora(self, model, cfg):
        from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks

        g, rank, kg = cfg["G"], 1024, cfg["H"] * 512 // cfg["G"]
        q, s = quantize_fp8_blocks(torch.randn(g * rank, kg, device="cuda") * kg**-0.5)
        wo_a = dequantize_fp8_blocks(q, s).to(torch.bfloat16)  # a checkpoint-made wo_a (what the model holds)
        for t in (*tg.TOKENS[:3], 512, 1024, 4096):
            if self.late():
                return
            self._o_lora_case(model, wo_a, g, rank, t)

    def _o_lora_case(self, model, wo_a, g, rank, t):
        from parity.optimized.ops.aiter.o_lora import per_tensor_fp8, reference_math

        kg = wo_a.shape[1]
        wq, ws = per_tensor_fp8(wo_a, g)
        o = tg.act(t, g * kg)
        w3 = wo_a.view(g, rank, kg)
        run = {
            "aiter": lambda: self.aiter.o_lora(o, wo_a, g, rank, (0, t)),
            "triton": lambda: self.triton.o_lora(o, wo_a, g, rank, (0, t)),
        }
        ms = {b: tg.bench_ms(f) for b, f in run.items()}
        ein_ms = tg.bench_ms(lambda: torch.einsum("sgd,grd->sgr", o.view(t, g, kg), w3))
        sub = min(t, 64)
        got = run["aiter"]()[:sub]
        osub = o[:sub].view(sub, g, kg)
        acc = reference_math(osub, wq, ws)  # the kernel's FP8 math with exact block sums, fp32 accumulation
        einsum = torch.einsum("sgd,grd->sgr", osub, w3)
        golden = torch.einsum("sgd,grd->sgr", osub.double(), w3.double())
        # sum |q a_s| |wq ws| <= sum |o| |wq| ws (1 + 2^-4): the quantized activation is within half a step of o
        abs_sum = torch.einsum("sgd,grd->sgr", osub.double().abs(), wq.double().abs()) * float(ws) * (1 + 2.0**-4)
        exc = tg.gemm_excess(got, acc.to(torch.bfloat16), acc.double(), abs_sum * (2.0**-12 + 128 * 2.0**-23))
        extra = dict(
            einsum_ms=round(ein_ms, 4),
            aiter_vs_einsum=round(ein_ms / ms["aiter"], 2),
            cos_aiter_vs_einsum=round(cos(got, einsum), 6),
            cos_triton_vs_einsum=round(cos(run["triton"]()[:sub], einsum), 6),
            max_err_aiter=float((got.double() - golden).abs().max()),
            max_err_einsum=float((einsum.double() - golden).abs().max()),
        )
        self.record(
            "o_lora", model, t, f"G={g} K={kg} N={rank}", ms["aiter"], ms["triton"],
            g * rank * kg + t * g * kg * 2 + t * g * rank * 2, 2 * t * g * rank * kg, "fp8_flops", extra,
            ("excess over its own FP8 math", exc, 0.0, exc <= 0),
        )  # fmt: skip


def markdown(rows, roof):
    lines = [
        f"rooflines: copy {roof['copy_bytes_per_s'] / 1e12:.2f} TB/s, FP8 {roof['fp8_flops'] / 1e12:.0f} TFLOP/s, "
        f"bf16 {roof['bf16_flops'] / 1e12:.0f} TFLOP/s",
        "",
        "| op | model | T | shape | aiter ms | triton ms | aiter vs triton | % roofline | extra | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    skip = {"op", "model", "T", "shape", "aiter_ms", "triton_ms", "aiter_vs_triton", "pct_roofline", "check", "err"}
    for r in rows:
        extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in skip | {"tol", "ok"})
        ok = "ok" if r["ok"] else "FAIL"
        lines.append(
            f"| {r['op']} | {r['model']} | {r['T']} | {r['shape']} | {r['aiter_ms']} | {r['triton_ms']} | "
            f"{r['aiter_vs_triton']} | {r['pct_roofline']} | {extra} | {ok} ({r['err']:.3g}) |"
        )
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/aiter_ops.py needs a CUDA device", file=sys.stderr)
        return 2
    from parity.errors import ParityError

    try:
        roof = tg.measure_rooflines()
        bench = AiterBench(roof)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for model, cfg in tg.MODELS.items():
        bench.o_lora(model, cfg)
        bench.fp8_gemm(model, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(dict(rooflines=roof, rows=bench.rows, failures=bench.failures)))
    (args.out / "results.md").write_text(markdown(bench.rows, roof))
    print(markdown(bench.rows, roof))
    for f in bench.failures:
        print(f"CORRECTNESS FAILURE: {f}", file=sys.stderr)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())

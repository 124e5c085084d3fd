"""Tile-configuration sweep of the GEMM-side Triton kernels on the GPU, timed as a serving engine runs them: each
launch captured in a CUDA graph (no Python launch overhead in the time), and the weights rotated over enough copies
that every launch streams them from HBM, not from the 60 MB L2.

    python3 bench/triton_gemm_sweep.py --out DIR [--ops o_lora,fp8_gemm,fp4_gemm,moe_experts]

Per (op, shape, token count): the op's own call (autotuned) in eager mode (Python launch overhead included) and in a
graph, and each raw kernel configuration in a graph, with GB/s on the weight bytes or TFLOP/s. What it is for:
choosing the fixed per-shape-class configurations in the kernels' `_configs`. Writes sweep.json to --out.
"""

# ruff: noqa: B023  (every closure here is called inside the loop iteration that made it)
import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.triton_gemm import act, copies_for, fp4_weight, fp8_weight, graph_ms  # noqa: E402

DEADLINE_S = float(os.environ.get("SWEEP_DEADLINE_S", 200))


def graph_us(calls, reps: int = 0) -> float:
    """Median microseconds per call of `calls` replayed from one CUDA graph (bench/triton_gemm.py's timing)."""
    return 1e3 * graph_ms(calls, launches=reps * len(calls) if reps else 64)


def eager_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median")


class Sweep:
    def __init__(self):
        self.rows = []
        self.start = time.time()

    def late(self):
        return time.time() - self.start > DEADLINE_S

    def add(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def op(self, calls, **info):
        """The op's own call (autotuned): eager (Python launch overhead included), then replayed from a graph."""
        self.add(name="op eager", us=round(eager_us(calls[0]), 2), **info)
        self.try_config("op graph", calls, **info)

    def try_config(self, name, calls, **info):
        try:
            us = graph_us(calls)
        except Exception as e:  # a configuration that does not compile (resources) is a result, not a crash
            where = traceback.format_exc().splitlines()[-12:]
            self.add(name=name, error=f"{type(e).__name__}: {str(e)[:200]}", where=where, **info)
            return None
        self.add(name=name, us=round(us, 2), **info)
        return us


# ---- o_lora -----------------------------------------------------------------------------------------------------


def sweep_o_lora(sw: Sweep):
    from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks
    from parity.optimized.ops.triton import o_lora as mod

    for g in (8, 16):
        rank, kg = 1024, 4096
        nbytes = g * rank * kg
        n = copies_for(nbytes)
        ws = []
        for _ in range(n):
            q, s = quantize_fp8_blocks(torch.randn(g * rank, kg, device="cuda", dtype=torch.float32) * kg**-0.5)
            ws.append((dequantize_fp8_blocks(q, s).to(torch.bfloat16), q, s.view(torch.uint8)))
        for t in (1, 16, 64, 1024):
            if sw.late():
                return
            o = act(t, g * kg)
            op = [lambda w=w: mod.o_lora(o, w[0], g, rank, (0, t)) for w in ws]
            ein = [lambda w=w: torch.einsum("sgd,grd->sgr", o.view(t, g, kg), w[0].view(g, rank, kg)) for w in ws]
            info = dict(op="o_lora", G=g, T=t, weight_bytes=nbytes)
            sw.op(op, **info)
            sw.try_config("einsum graph", ein, **info)
            out = torch.empty(t, g, rank, dtype=torch.bfloat16, device="cuda")
            # (BLOCK_W, BLOCK_T, BLOCK_K, warps, stages, FP8 weight): decode, the op's own FP8 configurations
            if t <= 64:
                cfgs = [(*(c.kwargs[k] for k in ("BLOCK_W", "BLOCK_T", "BLOCK_K")), c.num_warps, c.num_stages, True)
                        for c in mod._configs(True)]  # fmt: skip
            else:
                cfgs = [(128, 256, 64, 8, 4, True), (128, 256, 64, 8, 4, False), (128, 256, 64, 8, 3, False),
                        (128, 128, 64, 8, 3, False)]  # fmt: skip
            # (a kernel from before R_ALIGNED, for A/B runs against an older tree, is called without it)
            aligned = {"R_ALIGNED": rank % 128 == 0} if "R_ALIGNED" in mod._o_lora_kernel.arg_names else {}
            for bw, bt, bk, nw, ns, fp8 in cfgs:
                if sw.late():
                    return

                def call(w, bw=bw, bt=bt, bk=bk, nw=nw, ns=ns, fp8=fp8):
                    wt, st = (w[1], w[2]) if fp8 else (w[0], w[0])
                    grid = (triton.cdiv(rank, bw), triton.cdiv(t, bt), g)
                    mod._o_lora_kernel[grid](
                        o, wt, st, out, t, rank, kg, 1, o.stride(0), wt.stride(0), st.stride(0), out.stride(0),
                        W_FP8=fp8, BITS=fp8, EVEN_K=True, DOT_F64=False, BLOCK_W=bw, BLOCK_T=bt, BLOCK_K=bk,
                        num_warps=nw, num_stages=ns, enable_fp_fusion=False, **aligned,
                    )  # fmt: skip

                label = f"cfg {bw}x{bt}x{bk} w{nw} s{ns} {'fp8' if fp8 else 'bf16'}-weight"
                sw.try_config(label, [lambda w=w, c=call: c(w) for w in ws], **info)


# ---- fp8_gemm ---------------------------------------------------------------------------------------------------


def gemm_case(op: str, name: str, n: int, k: int, t: int, nbytes: int):
    """`t` tokens of FP8 activations (per-128 ue8m0 scales) for a [n, k] weight, and the row fields of the case."""
    from parity.reference import kernels

    xq, xs = kernels.act_quant(act(t, k), 128, "ue8m0", torch.float8_e8m0fnu)
    return xq, xs, dict(op=op, shape=name, N=n, K=k, T=t, weight_bytes=nbytes, flops=2 * t * n * k)


def sweep_fp8_gemm(sw: Sweep):
    from parity.optimized.ops.triton import _gemm_common as common
    from parity.optimized.ops.triton import fp8_gemm as mod

    shapes = {"flash wq_a": (1024, 4096), "flash wo_b": (4096, 8192), "pro wq_b": (65536, 1536),
              "pro wo_b": (7168, 16384)}  # fmt: skip
    for name, (n, k) in shapes.items():
        nbytes = n * k
        copies = [fp8_weight(n, k) for _ in range(copies_for(nbytes))]
        n_kb = k // 128
        chunk, chunks = common.chunk_blocks(n_kb), common.n_chunks(n_kb)
        for t in (1, 64, 4096):
            if sw.late():
                return
            xq, xs, info = gemm_case("fp8_gemm", name, n, k, t, nbytes)
            sw.op([lambda c=c: mod.fp8_gemm(xq, xs, c[0], c[1], torch.float8_e8m0fnu) for c in copies], **info)
            out = torch.empty(t, n, dtype=torch.bfloat16, device="cuda")
            ws = torch.empty(chunks, t, n, dtype=torch.float32, device="cuda")
            # (BLOCK_W, BLOCK_T, warps, stages, split-K)
            if t == 1:
                cfgs = [(64, 16, 4, 4, True), (64, 16, 4, 3, True), (64, 16, 4, 4, False), (64, 16, 8, 4, True),
                        (64, 16, 8, 3, True), (64, 16, 8, 4, False)]  # fmt: skip
            elif t <= 64:
                cfgs = [(64, 64, 4, 4, True), (128, 64, 4, 4, True), (64, 32, 4, 4, True), (64, 64, 4, 4, False),
                        (64, 64, 8, 4, True), (64, 32, 8, 4, True), (128, 64, 8, 4, True)]  # fmt: skip
            else:
                cfgs = [(128, 64, 4, 4, False), (128, 64, 4, 3, False), (128, 64, 4, 5, False), (64, 128, 4, 4, False),
                        (128, 32, 4, 4, False), (64, 64, 4, 4, False), (128, 128, 4, 3, False)]  # fmt: skip
            for bw, bt, nw, ns, split in cfgs:
                if sw.late():
                    return
                if split and chunks == 1:
                    continue
                tfast = t > 64
                # split launches reduce as the op does (in the launch up to IN_LAUNCH_MAX_M tokens); the tiles'
                # arrival counters are the op's own buffer, sized before any graph capture
                in_launch = common.reduce_in_launch(t)
                cnt = common.tile_counters(xq.device, triton.cdiv(n, bw) * triton.cdiv(t, bt)) if split else out

                def call(c, bw=bw, bt=bt, nw=nw, ns=ns, split=split, tfast=tfast, cnt=cnt):
                    nw_, nt_ = triton.cdiv(n, bw), triton.cdiv(t, bt)
                    grid = (nt_, nw_, 1) if tfast else (nw_, nt_, chunks if split else 1)
                    mod._fp8_gemm_kernel[grid](
                        xq, xs.view(torch.uint8), c[0], c[1].view(torch.uint8), out, ws, cnt,
                        t, n, k, n_kb, chunk, 1,
                        xq.stride(0), xs.stride(0), c[0].stride(0), c[1].stride(0), out.stride(0),
                        A_E8M0=True, B_E8M0=True, FUSE_QUANT=False, CHUNKED=chunk > 1, SPLIT=split,
                        IN_LAUNCH=split and in_launch, DOT_F64=False, T_FAST=tfast, TMA=tfast and not split,
                        BLOCK_W=bw, BLOCK_T=bt,
                        num_warps=nw, num_stages=ns, enable_fp_fusion=False,
                    )  # fmt: skip
                    if split and not in_launch:
                        common.reduce_chunks(ws, out)

                sw.try_config(f"cfg {bw}x{bt} w{nw} s{ns} split={split}", [lambda c=c, f=call: f(c) for c in copies],
                              **info)  # fmt: skip


# ---- fp4_gemm / moe_experts ------------------------------------------------------------------------------------


def sweep_fp4_gemm(sw: Sweep):
    from parity.optimized.ops.triton import _gemm_common as common
    from parity.optimized.ops.triton import fp4_gemm as mod

    for name, (n, k) in {"flash w1": (2048, 4096), "pro w1": (3072, 7168), "pro w2": (7168, 3072)}.items():
        nbytes = n * k // 2
        copies = [fp4_weight(n, k) for _ in range(copies_for(nbytes))]
        for t in (1, 64, 4096):
            if sw.late():
                return
            xq, xs, info = gemm_case("fp4_gemm", name, n, k, t, nbytes)
            sw.op([lambda c=c: mod.fp4_gemm(xq, xs, c[0], c[1], torch.float8_e8m0fnu) for c in copies], **info)
            if t > 64:
                continue
            n_kb = k // 32
            chunk, chunks = common.chunk_blocks(n_kb), common.n_chunks(n_kb)
            out = torch.empty(t, n, dtype=torch.bfloat16, device="cuda")
            ws = torch.empty(chunks, t, n, dtype=torch.float32, device="cuda")
            bt = 16 if t == 1 else 64
            natural = k <= mod.NATURAL_MAX_K  # decode: the op's choice
            cfgs = [(64, 4, 4, True), (128, 4, 4, True), (64, 4, 3, True), (64, 4, 4, False), (64, 8, 4, True),
                    (64, 8, 3, True), (128, 8, 4, True), (64, 8, 4, False)]  # fmt: skip
            for bw, nw, ns, split in cfgs:
                if sw.late():
                    return
                # split launches reduce as the op does (in the launch up to IN_LAUNCH_MAX_M tokens); the tiles'
                # arrival counters are the op's own buffer, sized before any graph capture
                in_launch = common.reduce_in_launch(t)
                cnt = common.tile_counters(xq.device, triton.cdiv(n, bw) * triton.cdiv(t, bt)) if split else out

                def call(c, bw=bw, nw=nw, ns=ns, split=split, bt=bt, cnt=cnt):
                    grid = (triton.cdiv(n, bw), triton.cdiv(t, bt), chunks if split else 1)
                    mod._fp4_gemm_kernel[grid](
                        # A as the op passes it (in K order, or its pairs-order copy timed with the kernel)
                        xq if natural else common.pairs_order(xq), xs.view(torch.uint8), c[0].view(torch.uint8),
                        c[1].view(torch.uint8), out, ws, cnt,
                        t, n, k, n_kb, chunk, 1,
                        xq.stride(0), xs.stride(0), c[0].stride(0), c[1].stride(0), out.stride(0),
                        A_E8M0=True, B_E8M0=True, POW2=True, CHUNKED=chunk > 1, SPLIT=split,
                        IN_LAUNCH=split and in_launch, DOT_F64=False, SUB=4 if not split or chunk % 4 == 0 else 1,
                        X_NATURAL=natural,
                        BLOCK_W=bw, BLOCK_T=bt, num_warps=nw, num_stages=ns, enable_fp_fusion=False,
                    )  # fmt: skip
                    if split and not in_launch:
                        common.reduce_chunks(ws, out)

                sw.try_config(f"cfg {bw}x{bt} w{nw} s{ns} split={split}", [lambda c=c, f=call: f(c) for c in copies],
                              **info)  # fmt: skip


def sweep_moe_experts(sw: Sweep):
    from parity.optimized.ops.moe_experts import ExpertWeights
    from parity.optimized.ops.triton import moe_experts as mod

    d, inter, n_exp = 4096, 2048, 256
    experts = [ExpertWeights(fp4_weight(inter, d), fp4_weight(d, inter), fp4_weight(inter, d), 10.0)
               for _ in range(n_exp)]  # fmt: skip
    shared = ExpertWeights(fp8_weight(inter, d), fp8_weight(d, inter), fp8_weight(inter, d), 10.0)
    per_expert = 3 * (inter * d // 2 + inter * d // 32)
    for t in (1, 8, 64):
        if sw.late():
            return
        x = act(t, d) * 0.5
        # 4 token batches touching different experts: the graph replays them in turn so weights come from HBM
        batches = []
        for _ in range(4):
            idx = torch.rand(t, n_exp, device="cuda").topk(6, dim=-1).indices
            batches.append((idx, torch.rand(t, 6, device="cuda") * 0.5))
        touched = int(batches[0][0].unique().numel())
        info = dict(op="moe_experts", model="flash", T=t, weight_bytes=touched * per_expert + 3 * inter * d)
        calls = [lambda b=b: mod.moe_experts(x, b[1], b[0], experts, shared, "ue8m0", torch.float8_e8m0fnu)
                 for b in batches]  # fmt: skip
        sw.op(calls, **info)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--ops", default="o_lora,fp8_gemm,fp4_gemm,moe_experts")
    args = p.parse_args()
    from parity.optimized.ops.triton import runtime

    runtime.setup()  # as the registry does: the allocator for fp8_gemm's prefill TMA descriptors
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # the model's default dtype: the ops return it without a cast
    sw = Sweep()
    for op in args.ops.split(","):
        try:
            globals()[f"sweep_{op}"](sw)
        except Exception as e:  # keep the other ops' numbers
            sw.add(name="FAILED", op=op, error=f"{type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sweep.json").write_text(json.dumps(sw.rows, indent=0))


if __name__ == "__main__":
    main()

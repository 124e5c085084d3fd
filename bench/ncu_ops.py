"""One Triton op call at a bench shape, for Nsight Compute: the op runs (and autotunes) first, then once between
`cudaProfilerStart` / `cudaProfilerStop`, so `ncu --profile-from-start off` sees that call's kernels alone.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \\
        python3 bench/ncu_ops.py sparse_attn --t 64

Shapes (V4-Flash): sparse_attn decode at context 64k (CSA: 128 window rows + 512 entries of a 1 Mi-row pool),
moe_experts (256 FP4 experts, top-6), fp4_gemm (expert w1, N 2048 K 4096), o_lora (G 8, K 4096, rank 1024), hc_pre
(4 streams of D 4096, 20 Sinkhorn iterations); the FP4/FP8 weights are bench/triton_gemm.py's. Needs a CUDA device
(run from the repo root with PYTHONPATH=.).
"""

import argparse

import torch

from bench.attention_cases import decode_lists
from bench.triton_gemm import fp4_weight, fp8_weight
from parity.formats import dequantize_fp8_blocks, quantize_fp8_blocks
from parity.optimized.ops import OpsConfig, resolve_ops
from parity.optimized.ops.moe_experts import ExpertWeights

BF16 = torch.bfloat16


def sparse_attn_args(t: int) -> tuple:
    """(q, sources, idx, sink, scale) of Flash CSA decode at context 64k for `t` tokens (`attention_cases`): per token
    its 127 window rows, its own row and 512 random entries of a 1 Mi-row pool (1 GiB: beyond L2)."""
    d, h = 512, 64
    pool = torch.randn(1 << 20, d, dtype=BF16, device="cuda")
    sources, idx = decode_lists(t, 65536, 4, 512, d, pool, torch.Generator().manual_seed(0), "cuda")
    q, sink = torch.randn(t, h, d, dtype=BF16, device="cuda"), torch.randn(h, device="cuda")
    return q, sources, idx, sink, d**-0.5


def call(op: str, t: int, ops):
    """A closure running `op` at its bench shape with `t` tokens."""
    if op == "sparse_attn":
        args = sparse_attn_args(t)
        return lambda: ops.sparse_attn(*args)
    if op == "moe_experts":
        d, inter, n_exp = 4096, 2048, 256
        expert = lambda: ExpertWeights(fp4_weight(inter, d), fp4_weight(d, inter), fp4_weight(inter, d), 10.0)  # noqa: E731
        experts = [expert() for _ in range(n_exp)]
        shared = ExpertWeights(fp8_weight(inter, d), fp8_weight(d, inter), fp8_weight(inter, d), 10.0)
        x = torch.randn(t, d, dtype=BF16, device="cuda") * 0.5
        indices = torch.rand(t, n_exp, device="cuda").topk(6, dim=-1).indices
        weights = torch.rand(t, 6, device="cuda") * 0.5
        return lambda: ops.moe_experts(x, weights, indices, experts, shared, "ue8m0", torch.float8_e8m0fnu)
    if op == "fp4_gemm":
        (w, s), a = fp4_weight(2048, 4096), torch.randn(t, 4096, dtype=BF16, device="cuda")
        aq, a_s = ops.act_quant(a, 128, "ue8m0", torch.float8_e8m0fnu)
        return lambda: ops.fp4_gemm(aq, a_s, w, s, torch.float8_e8m0fnu)
    if op == "o_lora":
        g, rank, kg = 8, 1024, 4096
        q, s = quantize_fp8_blocks(torch.randn(g * rank, kg, device="cuda") * kg**-0.5)
        wo_a = dequantize_fp8_blocks(q, s).to(BF16)
        o = torch.randn(t, g * kg, dtype=BF16, device="cuda")
        return lambda: ops.o_lora(o, wo_a, g, rank)
    if op == "hc_pre":
        d, hc = 4096, 4  # Flash: 4 streams of D 4096, 20 Sinkhorn iterations
        x = torch.randn(t, hc, d, device="cuda").to(BF16)
        fn = torch.randn((2 + hc) * hc, hc * d, device="cuda", dtype=torch.float32) * (hc * d) ** -0.5
        scale = 0.5 + torch.rand(3, device="cuda", dtype=torch.float32)
        base = torch.randn((2 + hc) * hc, device="cuda", dtype=torch.float32) * 0.1
        return lambda: ops.hc_pre(x, fn, scale, base, (0, t), 1e-6, hc, 20, 1e-6)
    raise SystemExit(f"ncu_ops: unknown op {op!r} (sparse_attn, moe_experts, fp4_gemm, o_lora, hc_pre)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("op")
    p.add_argument("--t", type=int, default=64, help="tokens")
    args = p.parse_args()
    torch.set_default_dtype(BF16)
    ops = resolve_ops(OpsConfig(overrides=((args.op, "triton"), ("act_quant", "triton"))))
    fn = call(args.op, args.t, ops)
    for _ in range(3):  # compile, autotune, warm
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()

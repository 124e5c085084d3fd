"""Time the optimized ops' torch backend (= the reference kernels) at DeepSeek-V4-Flash shapes on a GPU.

    python bench/bench_ops.py [--tokens 64 1024] [--json out.json]

Prints one row per (op, tokens): median ms over timed runs (CUDA events, after warm-up), the op's ideal time on an
H100 (max of bytes / HBM bandwidth and FLOPs / tensor-core peak for its input dtype), and the achieved % of that
roofline. The torch backend emulates each official TileLang kernel exactly (float64 block products, 64-slot
online softmax in Python loops), so its % of roofline is the baseline a Triton or aiter kernel is measured from.
"""

import argparse
import json
import statistics

import torch

from parity.formats import quantize_fp4_groups, quantize_fp8_blocks
from parity.reference import kernels

# H100 SXM datasheet peaks (dense): HBM3 bandwidth, FP8 and BF16 tensor-core throughput
HBM_BYTES_S = 3.35e12
PEAK_FLOPS = {"fp8": 1979e12, "bf16": 989e12, "fp32": 67e12}


def timed(fn, warmup=3, iters=10) -> float:
    """Median milliseconds of `fn()` over `iters` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ideal_ms(bytes_moved: float, flops: float, dtype: str) -> float:
    return 1e3 * max(bytes_moved / HBM_BYTES_S, flops / PEAK_FLOPS[dtype])


def cases(t: int, dev: str):
    """(name, fn, bytes, flops, dtype) at V4-Flash sizes for t tokens."""
    bf16 = torch.bfloat16
    x = torch.randn(t, 4096, device=dev, dtype=bf16)
    yield (
        "act_quant [T,4096]",
        lambda: kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu),
        t * 4096 * 3,
        0,
        "fp32",
    )

    qr = torch.randn(t, 1024, device=dev, dtype=bf16)
    w, ws = (u.to(dev) for u in quantize_fp8_blocks(torch.randn(32768, 1024) * 0.03))
    a, sa = kernels.act_quant(qr, 128, "ue8m0", torch.float8_e8m0fnu)
    flops = 2 * t * 1024 * 32768
    yield (
        "fp8_gemm wq_b [T,1024]x[32768,1024]",
        lambda: kernels.fp8_gemm(a, sa, w, ws),
        32768 * 1024 + t * 1024 + t * 32768 * 2,
        flops,
        "fp8",
    )

    w4, ws4 = (u.to(dev) for u in quantize_fp4_groups(torch.randn(2048, 4096) * 0.02))
    w4 = w4.view(torch.float4_e2m1fn_x2)
    a4, sa4 = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    flops = 2 * t * 4096 * 2048
    yield (
        "fp4_gemm expert w1 [T,4096]x[2048,4096]",
        lambda: kernels.fp4_gemm(a4, sa4, w4, ws4),
        2048 * 2048 + t * 4096 + t * 2048 * 2,
        flops,
        "fp8",
    )

    k = 128 + 512
    q = torch.randn(1, t, 64, 512, device=dev, dtype=bf16)
    kv = torch.randn(1, t + 128, 512, device=dev, dtype=bf16)
    idx = torch.randint(0, t + 128, (1, t, k), device=dev, dtype=torch.int32)
    sink = torch.randn(64, device=dev)
    flops = 2 * 2 * t * 64 * k * 512
    yield (
        "sparse_attn h64 d512 k640",
        lambda: kernels.sparse_attn(q, kv, sink, idx, 512**-0.5),
        t * k * 512 * 2 + 2 * t * 64 * 512 * 2,
        flops,
        "bf16",
    )

    mixes = torch.randn(1, t, 24, device=dev)
    scale, base = torch.rand(3, device=dev), torch.randn(24, device=dev)
    yield (
        "hc_split_sinkhorn [T,24]",
        lambda: kernels.hc_split_sinkhorn(mixes, scale, base),
        t * (24 + 24) * 4,
        0,
        "fp32",
    )

    hq = torch.randn(t, 64, 128, device=dev, dtype=bf16)
    yield "hadamard [T,64,128]", lambda: kernels.hadamard_transform(hq, 128**-0.5), t * 64 * 128 * 4, 0, "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--json", default=None)
    opts = parser.parse_args()
    assert torch.cuda.is_available(), "bench_ops needs a CUDA device"
    torch.set_default_dtype(torch.bfloat16)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'op':44s} {'T':>5s} {'median ms':>10s} {'ideal ms':>9s} {'% roofline':>10s}")
    for t in opts.tokens:
        for name, fn, nbytes, flops, dtype in cases(t, "cuda"):
            ms = timed(fn)
            ideal = ideal_ms(nbytes, flops, dtype)
            rows.append(dict(op=name, tokens=t, median_ms=ms, ideal_ms=ideal, pct_roofline=100 * ideal / ms))
            print(f"{name:44s} {t:5d} {ms:10.3f} {ideal:9.4f} {100 * ideal / ms:9.2f}%")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

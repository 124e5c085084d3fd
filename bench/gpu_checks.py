"""Correctness checks that need a CUDA device (the CPU test suite cannot run them).

    python bench/gpu_checks.py kernels        # reference kernels: CUDA output == CPU output, bitwise
    python bench/gpu_checks.py engine         # parity run of the tiny case on CUDA (decode-exact and batched ops)
    PARITY_BACKEND=triton python bench/gpu_checks.py engine flash   # the same with the Triton kernels
    python bench/gpu_checks.py flash          # a Flash-shaped model (real widths, 16 experts, 2 layers + MTP)

Each section prints its results and a PASS/FAIL line; the exit code is 1 if any section failed.
"""

import argparse
import sys
import tempfile
import time
from dataclasses import replace

import torch

from parity.cases import Case, EngineSpec, RequestSpec, load_case
from parity.checkpoint import write_checkpoint
from parity.config import ModelArgs
from parity.formats import quantize_fp4_groups, quantize_fp8_blocks
from parity.reference import kernels
from parity.reference.model import default_dtype
from parity.run import run_case


def _same(name: str, cpu, cuda) -> bool:
    cpu = cpu if isinstance(cpu, tuple) else (cpu,)
    cuda = cuda if isinstance(cuda, tuple) else (cuda,)
    ok = all(torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.cpu().view(torch.uint8)
                         if b.element_size() == 1 else b.cpu()) for a, b in zip(cpu, cuda))  # fmt: skip
    print(f"  {name:40s} {'bitwise' if ok else 'DIFFERS'}")
    return ok


def _to_cuda(t: torch.Tensor) -> torch.Tensor:
    # move 1-byte formats (fp4 / fp8 / e8m0) as raw bytes
    return t.view(torch.uint8).cuda().view(t.dtype) if t.element_size() == 1 else t.cuda()


def _quant(x: torch.Tensor):
    return kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)


def check_kernels() -> bool:
    """The reference kernels compute block products and small reductions exactly: CPU and CUDA must agree."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(97, 512, generator=g) * 3).to(torch.bfloat16)
    w8, s8 = quantize_fp8_blocks(torch.randn(384, 512, generator=g) * 0.05)
    w4, s4 = quantize_fp4_groups(torch.randn(256, 512, generator=g) * 0.05)
    w4 = w4.view(torch.float4_e2m1fn_x2)
    q = torch.randn(2, 33, 16, 512, generator=g).to(torch.bfloat16)
    kv = torch.randn(2, 300, 512, generator=g).to(torch.bfloat16)
    idx = torch.randint(-1, 300, (2, 33, 200), generator=g, dtype=torch.int32)
    idx[..., 0] = 0
    sink = torch.randn(16, generator=g)
    mixes = torch.randn(3, 41, 24, generator=g)
    scale, base = torch.rand(3, generator=g) + 0.5, torch.randn(24, generator=g)
    h = torch.randn(5, 64, 128, generator=g).to(torch.bfloat16)
    ok = True
    with default_dtype(torch.bfloat16):
        for name, fn, args in [
            ("act_quant", lambda x: kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu), (x,)),
            ("act_quant inplace 64", lambda x: kernels.act_quant(x.clone(), 64, "ue8m0", torch.float32, True), (x,)),
            ("fp4_act_quant", lambda x: kernels.fp4_act_quant(x, 32), (x,)),
            ("fp8_gemm", lambda x, w, s: kernels.fp8_gemm(*_quant(x), w, s), (x, w8, s8)),
            ("fp4_gemm", lambda x, w, s: kernels.fp4_gemm(*_quant(x), w, s), (x, w4, s4)),
            ("sparse_attn", lambda q, kv, s, i: kernels.sparse_attn(q, kv, s, i, 512**-0.5), (q, kv, sink, idx)),
            ("hc_split_sinkhorn", lambda m, a, b: kernels.hc_split_sinkhorn(m, a, b), (mixes, scale, base)),
            ("hadamard_transform", lambda h: kernels.hadamard_transform(h, 128**-0.5), (h,)),
        ]:  # fmt: skip
            ok &= _same(name, fn(*args), fn(*(_to_cuda(a) for a in args)))
    return ok


def _print_report(label: str, report, seconds: float) -> None:
    """The verdict, the worst own error per phase over all sites, and the requests (chained run)."""
    state = "PASS" if report.passed else "FAIL"
    print(
        f"  {label}: {state} in {seconds:.1f}s; backends {sorted(set(report.backends.values()))}; noise {report.noise}"
    )
    if report.location:
        print(f"    first failure: {report.location}")
    worst: dict[str, dict] = {}
    for r in report.sites:
        if r["compared"] and (r["phase"] not in worst or r["max_err"] > worst[r["phase"]]["max_err"]):
            worst[r["phase"]] = r
    for phase, r in sorted(worst.items()):
        print(
            f"    worst own error, {phase}: {r['max_err']:.3g} at {r['site']} {r['field']} (threshold {r['threshold']})"
        )
    bitwise = sum(r["bitwise"] for r in report.sites)
    print(f"    sites x fields x phases bitwise: {bitwise}/{len(report.sites)}")
    for r in report.requests:
        print(f"    req {r.index} prompt {r.prompt_len}: greedy equal {r.greedy_equal}, "
              f"logits max rel err {r.logits_max_err:.3g}, MTP {r.mtp}")  # fmt: skip


def check_engine() -> bool:
    """The built-in tiny case on CUDA with the ops PARITY_BACKEND / PARITY_OPS select: decode-exact (bitwise when
    every selected op is) and batched ops (judged by the case's noise model and the golden)."""
    ok = True
    case = load_case("tiny")
    with tempfile.TemporaryDirectory() as d:
        ckpt = write_checkpoint(d, case.model_args(), seed=case.seed)
        for exact in (True, False):
            spec = replace(case, engine=replace(case.engine, decode_exact_chunks=exact))
            t0 = time.time()
            report = run_case(spec, ckpt, "cuda")
            _print_report(f"tiny decode_exact={exact}", report, time.time() - t0)
            ok &= report.passed
    return ok


def check_flash() -> bool:
    """Flash widths (dim 4096, 64 heads x 512, q-LoRA 1024, o-LoRA 8 x 1024, indexer 64 x 128, top-k 512, expert
    2048) with 16 experts and two layers (CSA, HCA) plus MTP; a 2100-token prompt makes the indexer select."""
    args = ModelArgs.flash(
        n_layers=2, n_hash_layers=1, n_routed_experts=16, vocab_size=16384, compress_ratios=(4, 128, 0)
    )
    flash = ModelArgs.flash().to_dict()
    spec = Case(
        name="flash-shaped", preset="flash", seed=0,
        requests=(RequestSpec(2100, 3), RequestSpec(300, 3)),
        overrides=tuple(sorted((k, v) for k, v in args.to_dict().items() if v != flash[k])),
        engine=EngineSpec(chunk_size=1024, token_budget=2048, mtp_draft=1, decode_exact_chunks=True),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time()
        ckpt = write_checkpoint(d, spec.model_args(), seed=0)
        print(f"  checkpoint written in {time.time() - t0:.1f}s")
        t0 = time.time()
        report = run_case(spec, ckpt, "cuda")
    _print_report("flash-shaped decode-exact", report, time.time() - t0)
    return report.passed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sections", nargs="+", choices=["kernels", "engine", "flash"])
    opts = parser.parse_args()
    assert torch.cuda.is_available(), "gpu_checks needs a CUDA device"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failed = []
    for section in opts.sections:
        print(f"== {section}")
        t0 = time.time()
        ok = {"kernels": check_kernels, "engine": check_engine, "flash": check_flash}[section]()
        print(f"{'PASS' if ok else 'FAIL'} {section} ({time.time() - t0:.1f}s)")
        if not ok:
            failed.append(section)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

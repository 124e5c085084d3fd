"""Time the attention-side Triton kernels against the torch backend at DeepSeek-V4-Flash / Pro shapes on a GPU, with a
correctness check on the same shapes, and the % of rooflines measured in the same run.

    python3 bench/triton_attention.py --out DIR        (repo root on PYTHONPATH; torch + triton, one CUDA GPU)

Ops: sparse_attn (decode T = 1..256 at contexts 4k-64k, CSA lists of 128 window + index_topk 512 / 1024 entries and
HCA lists of 128 + ctx / 128; prefill 4k), indexer_topk, compress_pool, kv_fake_quant, fp4_fake_quant, hadamard,
act_quant at realistic token counts. Per row: median ms of the triton backend (`triton.testing.do_bench`) and of the
torch backend (the reference kernels; only where it fits the time budget), the bytes the op must move and its %
of the measured device-to-device copy bandwidth, for sparse_attn also the MMA FLOPs and % of the measured bf16
matmul rate (8192^3). Targets (issue): sparse_attn decode >= 50 % of copy bandwidth on the KV bytes read, prefill
>= 40 % of the bf16 rate, compressor / quantizers / Hadamard >= 60 % of copy bandwidth.

The op's GPU configuration is fixed per (heads, head dim) (batch invariance); rows "sparse_attn cfg" time every
candidate configuration at a Flash decode batch and prefill, the data for choosing it.

Correctness, on the bench shapes, against the torch backend: the quantizers and Hadamard bitwise; compress_pool
never further from the float64 pooling than torch plus 1 fp32 ulp; sparse_attn cosine >= 0.99999, at most 0.1 % of
outputs more than 2 bf16 ulp from torch and none further than 2^-6 of the row's largest output (the registry's
tolerance: bf16-P rounding flips and cancellation noise, tests/optimized/ops/test_sparse_attn.py judges it exactly);
indexer_topk the same ids modulo ties (the torch scores of the chosen ids equal, in order). Writes
`triton_attention.json` and `triton_attention.md` to --out; exits 1 on any correctness failure.

`--smoke` runs tiny shapes through Triton's CPU interpreter (script logic only, no timings worth reading).
`--compile-sm90 [NAME]` needs no GPU: it compiles every kernel (or those whose row name contains NAME) at the
bench's configurations for sm_90 (`bench/sm90.py`: the triton wheel's own ptxas) and writes registers, stack
(spills), shared memory, wgmma use and the loops' synchronous loads per kernel to --out.
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.sm90 import compile_sm90

OPS = (
    "sparse_attn", "indexer_topk", "compress_pool", "compress_state", "compress_finish", "compress_decode",
    "kv_fake_quant", "fp4_fake_quant", "hadamard", "act_quant", "rms_norm", "rope",
)  # fmt: skip
MODELS = {"flash": dict(heads=64, topk=512), "pro": dict(heads=128, topk=1024)}
HEAD_DIM, ROPE, INDEX_HEADS, INDEX_DIM = 512, 64, 64, 128


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    p.add_argument("--compile-sm90", nargs="?", const="", metavar="NAME",
                   help="compile every kernel (or those named ...NAME...) for sm_90 (no GPU needed)")  # fmt: skip
    p.add_argument("--ops", nargs="+", default=["memory", "indexer_topk", "sparse_attn"],
                   choices=["memory", "indexer_topk", "sparse_attn"], help="which groups of rows to run")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a few shapes per group (when device time is short)")
    return p.parse_args()


# ---- --compile-sm90: compile every kernel for sm_90 without a GPU ------------------------------------------------
# Triton's frontend and the NVIDIA backend (with the wheel's own ptxas) run on any machine: each kernel is compiled at
# the configurations the ops launch on an H100/H200 (with the launcher's run-time specialization: pointers 16-byte
# aligned, strides divisible by 16), and `cuobjdump -res-usage` reports registers, stack (register spills) and shared
# memory. This catches what the CPU interpreter cannot (non-constexpr globals, compile-time shapes, shared-memory
# overflow, spills) before any GPU time is spent.


def _sig(text: str) -> dict:
    """Parse "name:type ..." into a Triton signature dict."""
    return dict(item.split(":") for item in text.split())


ATTN_SIG = _sig(
    "q_ptr:*bf16 o_ptr:*bf16 idx_ptr:*i64 sink_ptr:*fp32 s0:*bf16 s1:*bf16 s2:*bf16 s3:*bf16 "
    "c1:i64 c2:i64 c3:i64 c4:i64 st0:i32 st1:i32 st2:i32 st3:i32 H:i32 K:i32 q_st:i32 q_sh:i32 idx_st:i32 "
    "scale:fp32"
)
TOPK_SIG = _sig("sc_ptr:*fp32 meta_ptr:*i64 out_ptr:*i64 L:i32 T:i32 K:i32 start_pos:i32 ratio:i32")
TREE_SIG = _sig("src_ptr:*fp32 meta_ptr:*i64 out_ptr:*i64 T:i32 W:i32 K:i32 start_pos:i32 ratio:i32")
RADIX_SIG = _sig("sc_ptr:*fp32 meta_ptr:*i64 tmp_ptr:*i64 out_ptr:*i64 T:i32 K:i32 start_pos:i32 ratio:i32")
POOL_SIG = _sig("kv_ptr:*fp32 sc_ptr:*fp32 out_ptr:*fp32 N:i32 W:i32 C:i32 kv_sn:i32 kv_sw:i32 sc_sn:i32 sc_sw:i32")
SCORES_SIG = _sig(
    "q_ptr:*bf16 e_ptr:*bf16 w_ptr:*bf16 out_ptr:*fp32 L:i32 H:i32 T:i32 D:i32 q_sl:i32 q_sh:i32 e_st:i32 w_sl:i32 "
    "w_sh:i32"
)
RAGGED_SCORES_SIG = _sig(
    "q_ptr:*bf16 pool_ptr:*bf16 rows_ptr:*i64 meta_ptr:*i64 w_ptr:*bf16 out_ptr:*fp32 L:i32 H:i32 E:i32 D:i32 "
    "ratio:i32 q_sl:i32 q_sh:i32 p_st:i32 w_sl:i32 w_sh:i32"
)
FP8_SIG = _sig("x_ptr:*bf16 y_ptr:*fp8e4nv s_ptr:*u8 yp_ptr:*fp8e4nv R:i32 NG:i32 x_row_stride:i32 y_row_stride:i32")
FP4_SIG = _sig("x_ptr:*bf16 R:i32 NG:i32 row_stride:i32")
HAD_SIG = _sig("x_ptr:*bf16 y_ptr:*bf16 R:i32 x_row_stride:i32 scale:fp32")
FINISH_SIG = _sig(
    "pooled_ptr:*fp32 w_ptr:*fp32 f_ptr:*fp32 pos_ptr:*i64 out_ptr:*bf16 M:i32 N:i32 eps:fp32 h_scale:fp32 stride_f:i32"
)
STATE_SIG = _sig(
    "kv_ptr:*fp32 sc_ptr:*fp32 ape_ptr:*fp32 rows_ptr:*i64 phase_ptr:*i64 slot_ptr:*i64 skv_ptr:*fp32 "
    "ssc_ptr:*fp32 bkv_ptr:*fp32 bsc_ptr:*fp32 N:i32 stride_kv:i32 stride_sc:i32"
)
DECODE_SIG = _sig(
    "kv_ptr:*fp32 sc_ptr:*fp32 ape_ptr:*fp32 rows_ptr:*i64 phase_ptr:*i64 slot_ptr:*i64 skv_ptr:*fp32 "
    "ssc_ptr:*fp32 ws_ptr:*fp32 out_ptr:*bf16 pool_ptr:*bf16 prow_ptr:*i64 w_ptr:*fp32 f_ptr:*fp32 pos_ptr:*i64 "
    "eps:fp32 h_scale:fp32 stride_kv:i32 stride_sc:i32 stride_f:i32 stride_pool:i32"
)
HC_PRE_SIG = _sig(
    "x_ptr:*bf16 fn_ptr:*fp32 scale_ptr:*fp32 base_ptr:*fp32 y_ptr:*bf16 post_ptr:*fp32 comb_ptr:*fp32 pre_ptr:*fp32 "
    "ws_ptr:*fp64 cnt_ptr:*i32 T:i32 D:i32 norm_eps:fp32 hc_eps:fp32 iters:i32 DS:i32 N_BLOCKS:i32"
)
COLLAPSE_SIG = _sig("x_ptr:*bf16 pre_ptr:*fp32 y_ptr:*bf16 T:i32 D:i32")
HC_HEAD_SIG = _sig(
    "x_ptr:*bf16 fn_ptr:*fp32 scale_ptr:*fp32 base_ptr:*fp32 y_ptr:*bf16 ws_ptr:*fp64 cnt_ptr:*i32 T:i32 D:i32 "
    "norm_eps:fp32 hc_eps:fp32"
)
# sizes and counts: not specialized as multiples of 16 (strides and pointers are)
NOT_DIVISIBLE = {"H", "K", "c1", "c2", "c3", "c4", "R", "NG", "N", "W", "C", "L", "T", "E", "M", "start_pos", "iters"}


def cases():
    """(name, kernel, signature, constexprs, num_warps, num_stages) at the ops' GPU launch configurations."""
    import triton

    from parity.optimized.ops.triton import (
        _mhc,
        act_quant,
        compress_decode,
        compress_finish,
        compress_pool,
        compress_state,
        fp4_fake_quant,
        hadamard,
        indexer_topk,
        sparse_attn,
        sparse_attn_wgmma,
    )

    quant = dict(ROUND_SCALE=True, S_E8M0=True, PAIRS=False, SCALE_SHIFT=0)
    aq = act_quant._fp8_group_kernel
    yield "act_quant [T, 4096] e8m0", aq, FP8_SIG, dict(BLOCK=128, BR=1, BG=32, MODE=0, **quant), 4, 3
    pairs = dict(BLOCK=128, BR=1, BG=32, MODE=0, **{**quant, "PAIRS": True})  # moe's FP4 inputs: the pairs copy too
    yield "act_quant [T, 4096] e8m0 pairs", aq, FP8_SIG, pairs, 4, 3
    kv = {**FP8_SIG, "y_ptr": "*bf16", "s_ptr": "*bf16", "yp_ptr": "*bf16"}
    yield "kv_fake_quant [T, 448]", aq, kv, dict(BLOCK=64, BR=8, BG=8, MODE=1, **quant), 4, 3
    fp4 = dict(BLOCK=32, BR=32, BG=4, SCALE_SHIFT=0)
    yield "fp4_fake_quant", fp4_fake_quant._fp4_group_kernel, FP4_SIG, fp4, 4, 3
    yield "hadamard d 128", hadamard._hadamard_kernel, HAD_SIG, dict(D=128, LOG_D=7, BR=16, REVERSED=False), 4, 3
    for bc in (512, 128):  # the pairs kernel: a row of 512 channels; a decode step's few entries split 4 ways
        yield f"compress_pool pairs BC {bc}", compress_pool._pool_pairs_kernel, POOL_SIG, dict(BN=1, BC=bc), 4, 3
    yield "compress_pool tile w 128 d 512", compress_pool._pool_tile_kernel, POOL_SIG, dict(WP=128, BN=1, BC=16), 4, 3
    for ratio, overlap, hd in ((4, True, 512), (4, True, 128), (128, False, 512)):
        rows, cd = (2 if overlap else 1) * ratio, (2 if overlap else 1) * hd
        wr = triton.next_power_of_2(rows)
        consts = dict(RATIO=ratio, HD=hd, CD=cd, ROWS=rows, OVERLAP=overlap, HAS_ROWS=False, EMIT=True, NP=64, WR=wr,
                      BC=min(triton.next_power_of_2(cd), max(16, 4096 // wr)), PLANT=0)  # fmt: skip
        yield f"compress_state r {ratio} d {hd}", compress_state._state_kernel, STATE_SIG, consts, 4, 3
        consts = {k: v for k, v in consts.items() if k != "PLANT"}
        consts.update(PC=min(hd, max(16, 1024 // wr)), RD=64, ROTATE=hd == 128, LOG_D=hd.bit_length() - 1,
                      ROUND_SCALE=True, FP8=True, FUSED=True, PLANT=0)  # fmt: skip
        yield f"compress_decode r {ratio} d {hd}", compress_decode._decode_kernel, DECODE_SIG, consts, 4, 3
    for d, rotate in ((512, False), (128, True)):
        consts = dict(D=d, RD=64, BM=1, ROTATE=rotate, LOG_D=d.bit_length() - 1, ROUND_SCALE=True, FP8=True,
                      FUSED=True, PLANT=0)  # fmt: skip
        yield f"compress_finish d {d} rotate {rotate}", compress_finish._finish_kernel, FINISH_SIG, consts, 4, 3
    scores = dict(HP=64, DP=128, BR=1, BT=64, W_BF16=True)
    yield "indexer scores h 64", indexer_topk._scores_kernel, SCORES_SIG, scores, 4, 3
    yield "indexer ragged scores h 64", indexer_topk._ragged_scores_kernel, RAGGED_SCORES_SIG, scores, 4, 3
    for ragged in (False, True):
        rank = dict(TP=128, BR=1, RAGGED=ragged)
        yield f"indexer top-k rank t <= 128 ragged {ragged}", indexer_topk._topk_rank_kernel, TOPK_SIG, rank, 8, 3
        for kp in (512, 1024):
            for first, src in ((True, "*fp32"), (False, "*i64")):
                tree = dict(KP=kp, C=4096, FROM_SCORES=first, FINAL=not first, RAGGED=ragged)
                sig = {**TREE_SIG, "src_ptr": src}
                name = f"indexer top-k tree k {kp} C 4096 first {first} ragged {ragged}"
                yield name, indexer_topk._topk_tree_kernel, sig, tree, 8, 3
            radix = dict(KP=kp, C=4096, RAGGED=ragged, PLANT=0)
            name = f"indexer top-k radix k {kp} C 4096 ragged {ragged}"
            yield name, indexer_topk._topk_radix_kernel, RADIX_SIG, radix, 8, 3
    from parity.optimized.ops.triton import hc_head, hc_pre

    for d in (4096, 7168):  # the mHC mixers at their launch tiles: decode (the narrow finisher) to prefill
        for t in (1, 4, 64, 256, 1024, 4096):
            cfg = _mhc.config(t, d, "hc_pre")
            tiles = {k: cfg[k] for k in ("BT", "BK", "KSPLIT", "BD", "BTF", "BDF", "ROWWISE")}
            splits = triton.cdiv(4 * d, cfg["KSPLIT"])
            name = f"D {d} T {t} BT {cfg['BT']} BTF {cfg['BTF']} BDF {cfg['BDF']}"
            # the shared collapse where the launch allows it on an H100 / H200 (132 SMs), else at prefill sizes the
            # collapse programs queued after the mix programs (TAIL)
            share, _, bds = hc_pre.share_plan(cfg, splits, triton.cdiv(t, cfg["BT"]), d, 132)
            tail, ncol = hc_pre.tail_plan(cfg, splits, share, d)
            consts = dict(HC=4, R=8, SPLITS=splits, PLANT=0, **tiles, APART=cfg["APART"], SHARE=share, BDS=bds)
            consts.update(TAIL=tail, NCOL=ncol, BDT=cfg["BDT"])
            yield f"hc_pre {name}", hc_pre._hc_pre_kernel, HC_PRE_SIG, consts, cfg["num_warps"], 3
            if t == 64:  # the collapse as a launch of its own (`_mhc.COLLAPSE_TILE`)
                consts = dict(consts, APART=True, SHARE=False, TAIL=False, NCOL=1)
                yield f"hc_pre {name} APART", hc_pre._hc_pre_kernel, HC_PRE_SIG, consts, cfg["num_warps"], 3
            head = _mhc.config(t, d, "hc_head")  # hc_head's own tiles
            splits = triton.cdiv(4 * d, head["KSPLIT"])
            consts = dict(HC=4, NP=16, SPLITS=splits, **{k: head[k] for k in tiles})
            name = f"D {d} T {t} BT {head['BT']} BTF {head['BTF']} BDF {head['BDF']}"
            yield f"hc_head {name}", hc_head._hc_head_kernel, HC_HEAD_SIG, consts, head["num_warps"], 3
        bt, bd = _mhc.COLLAPSE_TILE
        yield f"hc_pre collapse D {d}", hc_pre._collapse_kernel, COLLAPSE_SIG, dict(HC=4, BT=bt, BD=bd), 4, 3
    for bh, warps, stages, parts in sparse_attn.CONFIGS:
        consts = dict(D=512, DP=512, BN=64, BH=bh, NPART=parts)
        name = f"sparse_attn d 512 BH {bh} warps {warps} stages {stages} parts {parts}"
        yield name, sparse_attn._sparse_attn_kernel, ATTN_SIG, consts, warps, stages
    for d in sparse_attn_wgmma.DIMS:  # the op's kernel on sm_90 (Gluon)
        consts = dict(D=d, BH=sparse_attn_wgmma.HEADS, BN=64, num_warps=sparse_attn_wgmma.WARPS)
        kernel, warps = sparse_attn_wgmma._sparse_attn_wgmma_kernel, sparse_attn_wgmma.WARPS
        yield f"sparse_attn_wgmma d {d}", kernel, ATTN_SIG, consts, warps, 1


def compile_report(out: Path, only: str) -> int:
    """Compile every kernel whose name contains `only` (the rule of `bench/triton_gemm.py --compile-check NAME`) for
    sm_90 and write what `bench.sm90.compile_sm90` reports (registers, stack, shared memory, wgmma, synchronous loads)
    to out/compile_sm90.json."""
    chosen = [case for case in cases() if only in case[0]]
    if not chosen:
        print(f"--compile-sm90: no kernel's name contains {only!r} (e.g. 'sparse_attn', 'hc_pre')")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for name, kernel, sig, consts, warps, stages in chosen:
        try:
            ints = {k for k, v in sig.items() if v in ("i32", "i64")} - NOT_DIVISIBLE
            divisible = ints | {k for k, v in sig.items() if v.startswith("*")}
            row = dict(kernel=name, **compile_sm90(kernel, sig, consts, warps, stages, divisible))
        except Exception as e:  # a kernel that does not compile is the finding
            failed += 1
            row = dict(kernel=name, error=f"{type(e).__name__}: {str(e)[-500:]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "compile_sm90.json").write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


ARGS = parse()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"
if ARGS.compile_sm90 is not None:
    sys.exit(compile_report(ARGS.out, ARGS.compile_sm90))

from bench.attention_cases import decode_lists, prefill_lists  # noqa: E402
from bench.cuda_graph import captured  # noqa: E402
from parity.optimized.ops import OpsConfig, resolve_ops  # noqa: E402

TRITON = resolve_ops(OpsConfig(overrides=tuple((op, "triton") for op in OPS)))  # sets the runtime up first
TORCH = resolve_ops()
DEV = "cpu" if ARGS.smoke else "cuda"
BF16 = torch.bfloat16
FAILURES: list[str] = []
ROWS: list[dict] = []


def bench_ms(fn, *args) -> float:
    """Median ms of fn(*args)."""
    call = functools.partial(fn, *args)
    if ARGS.smoke:
        t = time.perf_counter()
        call()
        return 1e3 * (time.perf_counter() - t)
    import triton.testing

    return float(triton.testing.do_bench(call, warmup=10, rep=60, return_mode="median"))


def graph_ms(fn, *args, calls: int = 20) -> float:
    """ms per call of `calls` calls captured in one CUDA graph and replayed: the GPU's own time, without the host's
    per-call launch overhead (Python argument handling, small torch ops), which bounds the smallest batches."""
    call = functools.partial(fn, *args)
    if ARGS.smoke:
        return bench_ms(call)
    return bench_ms(captured([call], calls).replay) / calls


def cold_ms(fn, tensors, *rest, nbytes: int, view=lambda t: t) -> float | None:
    """ms per call of fn(*(view(copy) for each of `tensors`), *rest) replayed from one CUDA graph, the calls cycling
    over enough copies of the tensors that each call reads its operands from HBM rather than from the 60 MB L2: a
    memory-bound op's own rate. Back-to-back calls on the same inputs (`graph_ms`) would read them from L2 wherever
    they fit."""
    if ARGS.smoke:
        return None
    from bench.triton_gemm import copies_for
    from bench.triton_gemm import graph_ms as rotated_graph_ms

    copies = [[view(t.clone()) for t in tensors] for _ in range(copies_for(nbytes))]
    return rotated_graph_ms([functools.partial(fn, *c, *rest) for c in copies])


def slow_ms(fn, *args) -> float:
    """The torch backend: few runs (it can take seconds)."""
    if ARGS.smoke:
        return bench_ms(fn, *args)
    fn = functools.partial(fn, *args)
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rooflines() -> dict:
    if ARGS.smoke:
        return {"copy_GBps": 1.0, "bf16_TFLOPs": 1.0}
    n = 1 << 29  # 1 GiB of bf16 each way
    src, dst = torch.empty(n, dtype=BF16, device=DEV), torch.empty(n, dtype=BF16, device=DEV)
    ms = bench_ms(dst.copy_, src)
    copy = 2 * src.nbytes / ms / 1e6
    a, b = torch.randn(8192, 8192, dtype=BF16, device=DEV), torch.randn(8192, 8192, dtype=BF16, device=DEV)
    ms = bench_ms(torch.matmul, a, b)
    del src, dst
    return {"copy_GBps": copy, "bf16_TFLOPs": 2 * 8192**3 / ms / 1e9}


def record(op, model, shape, tri_ms, torch_ms, nbytes, flops, check, roof, target, graph=None):
    row = dict(op=op, model=model, shape=shape, triton_ms=tri_ms, torch_ms=torch_ms, bytes=nbytes, flops=flops,
               graph_ms=graph, pct_copy_bw=100 * nbytes / (tri_ms * 1e6) / roof["copy_GBps"] if nbytes else None,
               pct_copy_bw_graph=100 * nbytes / (graph * 1e6) / roof["copy_GBps"] if nbytes and graph else None,
               pct_bf16=100 * flops / (tri_ms * 1e9) / roof["bf16_TFLOPs"] if flops else None,
               speedup=(torch_ms / tri_ms) if torch_ms else None, check=check, target=target)  # fmt: skip
    ROWS.append(row)
    pct = row["pct_bf16"] if target.startswith("bf16") else row["pct_copy_bw"]
    torch_txt = f"{torch_ms:9.3f}" if torch_ms else "        -"
    print(f"{op:15s} {model:6s} {shape:42s} {tri_ms:9.4f} ms  torch {torch_txt} ms  {pct or 0:6.1f}% ({target})",
          check, flush=True)  # fmt: skip


def fail(what: str) -> str:
    FAILURES.append(what)
    return "FAIL: " + what


# ---- correctness helpers ---------------------------------------------------------------------------------------


def bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16) if t.element_size() == 2 else t


def same_bits(name, a, b) -> str:
    return "bitwise" if torch.equal(bits(a), bits(b)) else fail(f"{name}: not bitwise equal to torch")


def ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    m = x.abs().to(dtype)
    return (torch.nextafter(m, torch.full_like(m, float("inf"))) - m).double()


def attn_check(name, got, want) -> str:
    g, w = got.double(), want.double()
    finite = ~w.isnan()
    if not torch.equal(got.isnan(), want.isnan()):
        return fail(f"{name}: NaN at other places")
    g, w = g[finite], w[finite]
    cos = float((g * w).sum() / (g.norm() * w.norm()).clamp(min=1e-30))
    diff = (g - w).abs()
    over2 = float((diff > 2 * ulp(w, BF16)).double().mean())
    rows = want.double().abs().amax(-1, keepdim=True).expand_as(want)[finite]
    worst = float((diff / rows.clamp(min=1e-30)).max())
    txt = f"cos {cos:.7f}, >2ulp {over2:.2e}, max|d|/rowmax {worst:.2e}"
    if cos < 0.99999 or over2 > 1e-3 or worst > 2**-6:
        return fail(f"{name}: {txt}")
    return txt


def pool_check(name, got, want, kv, score) -> str:
    gold = (kv.double() * torch.softmax(score.double(), dim=-2)).sum(-2)
    excess = (got.double() - gold).abs() - (want.double() - gold).abs() - ulp(gold, torch.float32)
    n = int((excess > 0).sum())
    return "<= torch + 1 ulp of float64" if n == 0 else fail(f"{name}: {n} outputs beyond torch + 1 ulp")


def topk_check(name, got, want, scores) -> str:
    # the torch scores of the chosen ids, in order: equal sequences = the same sets modulo ties
    sg = torch.where(got >= 0, scores.gather(1, got.clamp(min=0)), float("nan"))
    sw = torch.where(want >= 0, scores.gather(1, want.clamp(min=0)), float("nan"))
    same = torch.equal(sg.isnan(), sw.isnan()) and torch.equal(sg.nan_to_num(), sw.nan_to_num())
    return "ids equal modulo ties" if same else fail(f"{name}: id sets differ beyond ties")


# ---- cases -----------------------------------------------------------------------------------------------------


def bench_sparse_attn(roof, gen):
    scale = HEAD_DIM**-0.5
    d = 128 if ARGS.smoke else HEAD_DIM
    pool = torch.randn(4096 if ARGS.smoke else 1 << 20, d, dtype=BF16, device=DEV)  # 1 GiB: beyond L2
    for model, cfg in MODELS.items():
        h = 4 if ARGS.smoke else cfg["heads"]
        sink = torch.randn(h, device=DEV)
        decode = [(4, c) for c in (4096, 65536)] + [(128, c) for c in (4096, 16384, 65536)]
        decode = decode[:2] if ARGS.smoke else decode[1:2] if ARGS.quick else decode
        for ratio, ctx in decode:
            for t in (1, 4) if ARGS.smoke else (1, 64, 256) if ARGS.quick else (1, 16, 64, 256):
                sources, idx = decode_lists(t, ctx, ratio, cfg["topk"], d, pool, gen, DEV)
                q = torch.randn(t, h, d, dtype=BF16, device=DEV)
                valid = int((idx >= 0).sum())
                tri = bench_ms(TRITON.sparse_attn, q, sources, idx, sink, scale)
                gms = graph_ms(TRITON.sparse_attn, q, sources, idx, sink, scale)
                got = TRITON.sparse_attn(q, sources, idx, sink, scale)
                want = TORCH.sparse_attn(q, sources, idx, sink, scale)
                ref_ms = slow_ms(TORCH.sparse_attn, q, sources, idx, sink, scale) if t in (1, 256) else None
                name = f"decode {'CSA' if ratio == 4 else 'HCA'} ctx {ctx // 1024}k T {t} K {idx.shape[1]}"
                name += _kernel(q, sources)
                record("sparse_attn", model, name, tri, ref_ms, valid * d * 2, 4 * valid * h * d,
                       attn_check(f"sparse_attn {model} {name}", got, want), roof, "copy bw >= 50%", gms)  # fmt: skip
        if model == "flash":
            sweep_configs(roof, gen, pool, h, d, sink, scale, cfg)
        for ratio in (4,) if ARGS.quick else (4, 128):
            s = 256 if ARGS.smoke else 4096
            sources, idx = prefill_lists(s, ratio, cfg["topk"], d, gen, DEV)
            q = torch.randn(s, h, d, dtype=BF16, device=DEV)
            valid = int((idx >= 0).sum())
            tri = bench_ms(TRITON.sparse_attn, q, sources, idx, sink, scale)
            got = TRITON.sparse_attn(q, sources, idx, sink, scale)
            rows = torch.cat([torch.arange(0, 128), torch.arange(s - 128, s)]).to(DEV)  # the twin per query
            want = TORCH.sparse_attn(q[rows], sources, idx[rows], sink, scale)
            name = f"prefill {'CSA' if ratio == 4 else 'HCA'} {s} tokens K {idx.shape[1]}{_kernel(q, sources)}"
            record("sparse_attn", model, name, tri, None, valid * d * 2, 4 * valid * h * d,
                   attn_check(f"sparse_attn {model} {name}", got[rows], want), roof, "bf16 >= 40%")  # fmt: skip


def _kernel(q, sources) -> str:
    """Which kernel the op ran: the Gluon one on sm_90 (`sparse_attn_wgmma.fits`), else the Triton one."""
    from parity.optimized.ops.triton import sparse_attn_wgmma

    return " (Gluon)" if sparse_attn_wgmma.fits(q, list(sources)) else ""


def sweep_configs(roof, gen, pool, h, d, sink, scale, cfg):
    """Every GPU configuration of the Triton one-query kernel (`sparse_attn.CONFIGS`; a given `config` runs it on
    sm_90 too, where the op's default is the Gluon kernel) on a decode batch and a prefill: the data for choosing
    `default_config` (the op does not autotune: a row's bits must not depend on the winner)."""
    from parity.optimized.ops.triton import sparse_attn as kernel

    t, s = (4, 256) if ARGS.smoke else (256, 4096)
    decode = decode_lists(t, 65536, 4, cfg["topk"], d, pool, gen, DEV)
    prefill = prefill_lists(s, 4, cfg["topk"], d, gen, DEV)
    for what, (sources, idx), n in (("decode CSA ctx 64k T 256", decode, t), ("prefill CSA 4k", prefill, s)):
        q = torch.randn(n, h, d, dtype=BF16, device=DEV)
        valid = int((idx >= 0).sum())
        rows = torch.arange(min(n, 256), device=DEV)
        want = TORCH.sparse_attn(q[rows], sources, idx[rows], sink, scale)
        for config in kernel.CONFIGS[:1] if ARGS.smoke else kernel.CONFIGS:
            call = functools.partial(kernel.sparse_attn, q, sources, idx, sink, scale, config=config)
            name = f"{what}, BH {config[0]} warps {config[1]} stages {config[2]} parts {config[3]}"
            try:
                got = call()
            except Exception as e:  # e.g. out of shared memory on this device: a candidate, not the op's config
                print(f"sparse_attn cfg {name}: does not run here ({type(e).__name__}: {str(e)[:120]})", flush=True)
                continue
            target = "bf16 >= 40%" if what.startswith("prefill") else "copy bw >= 50%"
            record("sparse_attn cfg", "flash", name, bench_ms(call), None, valid * d * 2, 4 * valid * h * d,
                   attn_check(f"sparse_attn {name}", got[rows], want), roof, target)  # fmt: skip


def bench_indexer(roof, gen):
    from parity.reference import kernels

    for model, cfg in MODELS.items():
        h, d = (4, 128) if ARGS.smoke else (INDEX_HEADS, INDEX_DIM)
        shapes = [(1, 4096), (1, 16384), (1, 65536), (64, 65536), (4096, 4096)] if not ARGS.smoke else [(1, 512)]
        shapes = [(1, 65536), (4096, 4096)] if ARGS.quick else shapes
        for n, ctx in shapes:
            start = 0 if n == 4096 else ctx - n  # a 4k prefill, or n tokens after a context
            t = ctx // 4
            q = kernels.fp4_act_quant(torch.randn(n, h, d, device=DEV).to(BF16), 32, True)
            ent = kernels.fp4_act_quant(torch.randn(t, d, device=DEV).to(BF16), 32, True)
            w = (torch.randn(n, h, device=DEV) * (d**-0.5 * h**-0.5)).to(BF16)
            k = min(cfg["topk"], t)
            tri = bench_ms(TRITON.indexer_topk, q, ent, w, k, start, 4)
            gms = graph_ms(TRITON.indexer_topk, q, ent, w, k, start, 4)
            got = TRITON.indexer_topk(q, ent, w, k, start, 4)
            ref_ms = slow_ms(TORCH.indexer_topk, q, ent, w, k, start, 4) if n == 1 else None
            want = TORCH.indexer_topk(q, ent, w, k, start, 4)
            scores = torch.einsum("shd,td->sht", q, ent).relu_().mul_(w[..., None]).sum(1).float()
            name = f"{'prefill' if start == 0 else 'decode'} L {n} ctx {ctx // 1024}k entries {t} k {k}"
            record("indexer_topk", model, name, tri, ref_ms, n * t * d * 2, 2 * n * h * t * d,
                   topk_check(f"indexer_topk {model} {name}", got, want, scores), roof, "(no target)",
                   gms)  # fmt: skip


def bench_topk_methods(roof):
    """The top-k kernels alone on score rows (relu'd, bf16-valued: zeros tie, as the indexer's): the radix select
    ("triton ms" / "graph ms") against the merge tree (in the shape's name) for few long rows, where `_topk` picks
    between them (`MERGE_MIN_CHUNKS`, `MERGE_MAX_CHUNKS`); the same ids required (torch.equal)."""
    from parity.optimized.ops.triton import indexer_topk

    k = 512
    shapes = [(1, 1024), (2, 2048)] if ARGS.smoke else [(1, 16384), (1, 32768), (1, 65536), (4, 65536), (16, 65536),
                                                        (64, 16384), (1, 131072)]  # fmt: skip
    for n, t in shapes:
        scores = torch.randn(n, t, device=DEV).relu().to(BF16).float()
        calls = {
            method: functools.partial(indexer_topk._topk, scores, torch.empty(n, k, dtype=torch.int64, device=DEV),
                                      4 * t - 1, 4, None, method, None)
            for method in ("merge", "radix")
        }  # fmt: skip
        ids = {method: call().clone() for method, call in calls.items()}
        ms = {method: graph_ms(call) for method, call in calls.items()}
        same = torch.equal(ids["merge"], ids["radix"])
        check = "ids equal" if same else fail(f"indexer top-k methods L {n} entries {t}: ids differ")
        name = f"L {n} entries {t} k {k} (merge graph {ms['merge']:.4f} ms)"
        record("topk_radix", "-", name, bench_ms(calls["radix"]), None, scores.nbytes, 0, check, roof, "(no target)",
               ms["radix"])  # fmt: skip


def _per_request_indexer(q, pool, entry_rows, w, cu_seqlens, cu_entries, ks, starts, ratio):
    # what the engine did before the ragged op: one gather, then one indexer_topk call per request, -1 padded
    ent = pool[entry_rows]
    outs = [TRITON.indexer_topk(q[a:b], ent[e0:e1], w[a:b], k, s, ratio) for a, b, e0, e1, k, s in
            zip(cu_seqlens, cu_seqlens[1:], cu_entries, cu_entries[1:], ks, starts)]  # fmt: skip
    return torch.cat([torch.nn.functional.pad(o, (0, max(ks) - o.shape[1]), value=-1) for o in outs])


def bench_indexer_ragged(roof, gen):
    """A decode step of B requests as the engine calls it on one rank: one `indexer_topk_ragged` over the paged
    pool (row ids, blocks shuffled) against B per-request `indexer_topk` calls on gathered entries (what the engine
    did before); the same ids required (torch.equal)."""
    from parity.reference import kernels

    bs, h, d = (16, 4, 128) if ARGS.smoke else (16, INDEX_HEADS, INDEX_DIM)
    runs = [(4, 512)] if ARGS.smoke else [(64, 4096), (64, 16384)] if ARGS.quick else [(16, 4096), (64, 4096),
                                                                                        (64, 16384)]  # fmt: skip
    for model, cfg in MODELS.items():
        for b, ctx in runs:
            ctxs = torch.randint(ctx // 2, ctx + 1, (b,), generator=gen).tolist()  # mixed lengths up to ctx
            counts = [c // 4 for c in ctxs]
            need = [-(-c // bs) for c in counts]
            perm = torch.randperm(sum(need), generator=gen)  # each request's blocks scattered over the pool
            first = torch.tensor([0, *need]).cumsum(0).tolist()
            rows = [perm[first[i] :][torch.arange(n) // bs] * bs + torch.arange(n) % bs for i, n in enumerate(counts)]
            pool = kernels.fp4_act_quant(torch.randn(sum(need) * bs, d, device=DEV).to(BF16), 32, True)
            q = kernels.fp4_act_quant(torch.randn(b, h, d, device=DEV).to(BF16), 32, True)
            w = (torch.randn(b, h, device=DEV) * (d**-0.5 * h**-0.5)).to(BF16)
            ks = tuple(min(cfg["topk"], n) for n in counts)
            cu_e = tuple(torch.tensor([0, *counts]).cumsum(0).tolist())
            args = (q, pool, torch.cat(rows).to(DEV), w, tuple(range(b + 1)), cu_e, ks, tuple(c - 1 for c in ctxs), 4)
            got, want = TRITON.indexer_topk_ragged(*args), _per_request_indexer(*args)
            check = "ids equal" if torch.equal(got, want) else fail(f"indexer_topk_ragged {model}: ids differ")
            loop = bench_ms(_per_request_indexer, *args)
            name = f"decode B {b} ctx <= {ctx // 1024}k (loop {loop:.3f} ms)"
            nbytes = sum(counts) * d * 2
            record("indexer_ragged", model, name, bench_ms(TRITON.indexer_topk_ragged, *args), None, nbytes,
                   2 * h * nbytes, check, roof, "(no target)", graph_ms(TRITON.indexer_topk_ragged, *args))  # fmt: skip


def bench_memory_ops(roof):
    tokens = 256 if ARGS.smoke else 4096
    big = 512 if ARGS.smoke else 16384
    d = HEAD_DIM
    # compressor pooling: main CSA (2r = 8 positions), indexer CSA (d 128), HCA (128 positions)
    for name, shape in (
        (f"CSA main prefill {tokens}", (1, tokens // 4, 8, d)),
        (f"CSA main prefill {big}", (1, big // 4, 8, d)),
        (f"CSA indexer prefill {tokens}", (1, tokens // 4, 8, INDEX_DIM)),
        (f"HCA prefill {big}", (1, big // 128, 128, d)),
        ("decode batch 256 (CSA)", (256, 8, d)),
    ):
        kv, score = torch.randn(*shape, device=DEV), torch.randn(*shape, device=DEV) * 2
        tri = bench_ms(TRITON.compress_pool, kv, score)
        ref_ms = slow_ms(TORCH.compress_pool, kv, score)
        got, want = TRITON.compress_pool(kv, score), TORCH.compress_pool(kv, score)
        nbytes = 2 * kv.nbytes + got.nbytes
        cold = cold_ms(TRITON.compress_pool, (kv, score), nbytes=nbytes)
        record("compress_pool", "-", f"{name} {list(shape)}", tri, ref_ms, nbytes, 0,
               pool_check(f"compress_pool {name}", got, want, kv, score), roof, "copy bw >= 60%", cold)  # fmt: skip

    bench_compress_state(roof)
    bench_compress_finish(roof)
    bench_compress_decode(roof)

    for t in (tokens, big):
        kv = torch.randn(t, d, device=DEV).to(BF16)
        a, b = kv.clone(), kv.clone()
        TRITON.kv_fake_quant(a[:, :-ROPE], 64, "ue8m0", torch.float8_e8m0fnu, True)
        TORCH.kv_fake_quant(b[:, :-ROPE], 64, "ue8m0", torch.float8_e8m0fnu, True)
        work = kv.clone()  # the fake-quant is idempotent: timing it in place keeps the data on the grid
        tri = bench_ms(TRITON.kv_fake_quant, work[:, :-ROPE], 64, "ue8m0", torch.float8_e8m0fnu, True)
        ref_ms = slow_ms(TORCH.kv_fake_quant, work[:, :-ROPE], 64, "ue8m0", torch.float8_e8m0fnu, True)
        nbytes = 2 * t * (d - ROPE) * 2
        cold = cold_ms(TRITON.kv_fake_quant, (kv,), 64, "ue8m0", torch.float8_e8m0fnu, True, nbytes=nbytes,
                       view=lambda t: t[:, :-ROPE])  # fmt: skip
        record("kv_fake_quant", "-", f"window KV [{t}, {d}] (:{d - ROPE})", tri, ref_ms, nbytes, 0,
               same_bits("kv_fake_quant", a, b), roof, "copy bw >= 60%", cold)  # fmt: skip

    model, h = "both", INDEX_HEADS  # the indexer has 64 heads of 128 in Flash and Pro
    for t in (tokens, big):
        name, shape = f"indexer q [{t}, {h}, {INDEX_DIM}]", (t, h, INDEX_DIM)
        x = torch.randn(*shape, device=DEV).to(BF16)
        got, want = TRITON.hadamard(x, INDEX_DIM**-0.5), TORCH.hadamard(x, INDEX_DIM**-0.5)
        tri = bench_ms(TRITON.hadamard, x, INDEX_DIM**-0.5)
        ref_ms = slow_ms(TORCH.hadamard, x, INDEX_DIM**-0.5)
        cold = cold_ms(TRITON.hadamard, (x,), INDEX_DIM**-0.5, nbytes=2 * x.nbytes)
        record("hadamard", model, name, tri, ref_ms, 2 * x.nbytes, 0, same_bits("hadamard", got, want), roof,
               "copy bw >= 60%", cold)  # fmt: skip
        a, b = got.clone(), got.clone()
        TRITON.fp4_fake_quant(a, 32)
        TORCH.fp4_fake_quant(b, 32)
        work = got.clone()
        tri = bench_ms(TRITON.fp4_fake_quant, work, 32)
        ref_ms = slow_ms(TORCH.fp4_fake_quant, work, 32)
        cold = cold_ms(TRITON.fp4_fake_quant, (got,), 32, nbytes=2 * x.nbytes)
        record("fp4_fake_quant", model, name, tri, ref_ms, 2 * x.nbytes, 0, same_bits("fp4_fake_quant", a, b),
               roof, "copy bw >= 60%", cold)  # fmt: skip

    for model, dim in (("flash", 4096), ("pro", 7168), ("-", 2048)):
        for t in (tokens, big):
            dim_ = 256 if ARGS.smoke else dim
            x = torch.randn(t, dim_, device=DEV).to(BF16)
            yt, st = TRITON.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
            yr, sr = TORCH.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
            tri = bench_ms(TRITON.act_quant, x, 128, "ue8m0", torch.float8_e8m0fnu)
            ref_ms = slow_ms(TORCH.act_quant, x, 128, "ue8m0", torch.float8_e8m0fnu)
            ok = same_bits("act_quant y", yt, yr)
            ok = same_bits("act_quant s", st, sr) if ok == "bitwise" else ok
            nbytes = x.nbytes + yt.nbytes + st.nbytes
            cold = cold_ms(TRITON.act_quant, (x,), 128, "ue8m0", torch.float8_e8m0fnu, nbytes=nbytes)
            record("act_quant", model, f"[{t}, {dim_}]", tri, ref_ms, nbytes, 0, ok, roof, "copy bw >= 60%", cold)


COMPRESSORS = (("CSA main", 4, True, HEAD_DIM), ("CSA indexer", 4, True, INDEX_DIM), ("HCA", 128, False, HEAD_DIM))


def _state_case(n: int, ratio: int, overlap: bool, hd: int, pos: torch.Tensor):
    """One decode token of n requests at positions `pos` (scattered slots, a random state) -> (`compress_state`'s
    arguments before the state, the state [kv, score], the number of requests that complete a block)."""
    rows, cd = (1 + overlap) * ratio, (1 + overlap) * hd
    gen = torch.Generator(device=DEV).manual_seed(n)
    kv, score = (torch.randn(n, cd, device=DEV, generator=gen) for _ in range(2))
    ape = torch.randn(ratio, cd, device=DEV, generator=gen)
    slots = torch.randperm(n, device=DEV, generator=gen)
    done = slots[(pos + 1) % ratio == 0]
    state = [torch.randn(n, rows, cd, device=DEV, generator=gen) for _ in range(2)]
    m = done.numel()
    return (kv, score, ape, None, pos % ratio, slots, done if m else None), state, m


def bench_compress_state(roof):
    """A decode step's compressor state machine (one token per request): the Triton op's one launch against the
    torch form's ~10, at CSA (ratio 4, overlap; a quarter of the requests complete a block) and HCA (ratio 128, one in
    64 completes); bytes: the projections read, the state rows written, and for the completing requests their
    state read, the blocks written and (overlap) the shift."""
    for name, ratio, overlap, hd in COMPRESSORS:
        for n in (64, 256):
            rows, cd = (1 + overlap) * ratio, (1 + overlap) * hd
            pos = torch.arange(n, device=DEV) if ratio == 4 else 1001 + 2 * torch.arange(n, device=DEV)
            args, state, m = _state_case(n, ratio, overlap, hd, pos)
            a, b = [s.clone() for s in state], [s.clone() for s in state]
            got, want = TRITON.compress_state(*args, *a, overlap), TORCH.compress_state(*args, *b, overlap)
            ok = same_bits("compress_state kv state", a[0], b[0])
            if ok == "bitwise" and want is not None:
                ok = same_bits("compress_state blocks", torch.cat(got), torch.cat(want))
            work = [s.clone() for s in state]  # timed in place: each call writes the same rows again
            tri = bench_ms(TRITON.compress_state, *args, *work, overlap)
            ref_ms = bench_ms(TORCH.compress_state, *args, *work, overlap)
            nbytes = 4 * (2 * n * cd + 2 * n * cd + m * (2 * rows * cd + 2 * rows * hd + (rows * cd if overlap else 0)))
            graph = graph_ms(TRITON.compress_state, *args, *work, overlap)
            record("compress_state", "-", f"{name} decode {n} ({m} complete)", tri, ref_ms, nbytes, 0, ok, roof,
                   "one launch", graph)  # fmt: skip


def _finish_chain(pooled, w, table, pos, rotate, fmt):
    """The Triton ops compress_finish fuses, in sequence."""
    e = TRITON.rms_norm(pooled.to(BF16), w, 1e-6)
    TRITON.rope(e[..., -ROPE:], table[pos])
    if rotate:
        return TRITON.fp4_fake_quant(TRITON.hadamard(e, e.shape[-1] ** -0.5), 32)
    TRITON.kv_fake_quant(e[..., :-ROPE], 64, *fmt, True)
    return e


def bench_compress_finish(roof):
    """New entries from pooled values (norm, RoPE, Hadamard + FP4 or FP8 fake-quant) for the entries of one decode
    step: the fused kernel against the Triton ops it replaces run in sequence (and their bits)."""
    for name, d, rotate in (("CSA main", HEAD_DIM, False), ("CSA indexer", INDEX_DIM, True)):
        for m in (16, 64):
            pooled = torch.randn(m, d, device=DEV)
            w = 1 + 0.1 * torch.randn(d, device=DEV)
            table = torch.polar(torch.ones(4096, ROPE // 2, device=DEV), torch.rand(4096, ROPE // 2, device=DEV) * 6)
            pos = torch.randint(0, 4096, (m,), device=DEV)
            fmt = ("ue8m0", torch.float8_e8m0fnu)
            args = (pooled, w, 1e-6, (0, m), table, pos, rotate, *fmt, True)

            chain = functools.partial(_finish_chain, pooled, w, table, pos, rotate, fmt)
            ok = same_bits("compress_finish", TRITON.compress_finish(*args), chain())
            tri = bench_ms(TRITON.compress_finish, *args)
            nbytes = m * d * (4 + 2) + m * ROPE * 4
            record("compress_finish", "-", f"{name} {m} entries (chain {bench_ms(chain):.4f} ms)", tri,
                   bench_ms(TORCH.compress_finish, *args), nbytes, 0, ok, roof, "one launch",
                   graph_ms(TRITON.compress_finish, *args))  # fmt: skip


def _decode_chain(args, overlap, tail, prow, state, pool):
    """The Triton ops compress_decode fuses, in sequence, and the indexed write."""
    blocks = TRITON.compress_state(*args, *state, overlap)
    if blocks is None:
        return None
    pooled = TRITON.compress_pool(*blocks)
    entries = TRITON.compress_finish(pooled, tail[0], tail[1], (0, pooled.shape[0]), *tail[2:])
    pool[prow] = entries
    return entries


def bench_compress_decode(roof):
    """A compressor's whole decode step (state machine, pooling, norm / RoPE / fake-quant, paged write) for one token
    per request: the fused kernel against the three Triton ops and the indexed write it replaces, in sequence (and
    their bits); bytes: compress_state's, the completed blocks read once more for the pooling, the entries written
    twice (output and pool)."""
    fmt = ("ue8m0", torch.float8_e8m0fnu)
    for name, ratio, overlap, hd in COMPRESSORS:
        for n in (1, 64):
            rows, cd = (1 + overlap) * ratio, (1 + overlap) * hd
            # CSA: every fourth request completes a block (the first always); HCA: the first
            pos = 3 + torch.arange(n, device=DEV) if ratio == 4 else 127 + 3 * torch.arange(n, device=DEV)
            args, state, m = _state_case(n, ratio, overlap, hd, pos)
            w = 1 + 0.1 * torch.randn(hd, device=DEV)
            table = torch.polar(torch.ones(4096, ROPE // 2, device=DEV), torch.rand(4096, ROPE // 2, device=DEV) * 6)
            epos = (pos[(pos + 1) % ratio == 0] // ratio * ratio) % 4096
            pool = torch.zeros(4 * n, hd, dtype=BF16, device=DEV)
            prow = torch.randperm(4 * n, device=DEV)[:m]
            tail = (w, 1e-6, table, epos, hd == INDEX_DIM, *fmt, True)

            chain = functools.partial(_decode_chain, args, overlap, tail, prow)
            a, b = [s.clone() for s in state], [s.clone() for s in state]
            pa, pb = pool.clone(), pool.clone()
            TRITON.compress_decode(*args, *a, overlap, *tail, pa, prow)
            chain(b, pb)
            ok = same_bits("compress_decode kv state", a[0], b[0])
            if ok == "bitwise":
                ok = same_bits("compress_decode pool", pa, pb)
            work, wp = [s.clone() for s in state], pool.clone()  # timed in place: each call writes the same rows
            fused = functools.partial(TRITON.compress_decode, *args, *work, overlap, *tail, wp, prow)
            nbytes = 4 * (4 * n * cd + m * (2 * rows * cd + (rows * cd if overlap else 0))) + 2 * 2 * m * hd
            record("compress_decode", "-", f"{name} decode {n} ({m} complete; chain "
                   f"{bench_ms(chain, work, wp):.4f} ms, graph {graph_ms(chain, work, wp):.4f})", bench_ms(fused),
                   bench_ms(TORCH.compress_decode, *args, *work, overlap, *tail, wp, prow), nbytes, 0, ok, roof,
                   "one launch", graph_ms(fused))  # fmt: skip


def write(roof, wall):
    ARGS.out.mkdir(parents=True, exist_ok=True)
    device = "cpu (interpreter smoke run)" if ARGS.smoke else torch.cuda.get_device_name()
    meta = dict(device=device, torch=torch.__version__, rooflines=roof, wall_s=wall, failures=FAILURES)
    (ARGS.out / "triton_attention.json").write_text(json.dumps(dict(meta=meta, rows=ROWS), indent=1))
    lines = [
        f"# Triton attention-side kernels on {device}",
        "",
        f"Measured rooflines: device copy {roof['copy_GBps']:.0f} GB/s (read + write), bf16 matmul 8192^3 "
        f"{roof['bf16_TFLOPs']:.0f} TFLOP/s. torch {torch.__version__}. Wall {wall:.0f} s.",
        "",
        "triton ms: median per call, the host's launch overhead included; graph ms: calls captured in one CUDA "
        "graph, per call (the GPU's own time), and % copy bw of that time: 20 calls on the same inputs for "
        "indexer_topk and sparse_attn, and for the memory-bound ops calls cycling over input copies that exceed the "
        "L2, so that each reads from HBM.",
        "",
        "| op | model | shape | triton ms | graph ms | torch ms | speedup | % copy bw | % copy bw graph | % bf16 | "
        "target | check |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in ROWS:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(
            f"| {r['op']} | {r['model']} | {r['shape']} | {r['triton_ms']:.4f} | {f(r['graph_ms'], '.4f')} | "
            f"{f(r['torch_ms'], '.3f')} | {f(r['speedup'], '.1f')} | {f(r['pct_copy_bw'], '.1f')} | "
            f"{f(r['pct_copy_bw_graph'], '.1f')} | {f(r['pct_bf16'], '.1f')} | {r['target']} | {r['check']} |"
        )
    (ARGS.out / "triton_attention.md").write_text("\n".join(lines) + "\n")


def main():
    if not ARGS.smoke and not torch.cuda.is_available():
        sys.exit("bench/triton_attention.py needs a CUDA GPU (or --smoke for the CPU interpreter)")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    roof = rooflines()
    print(f"rooflines: copy {roof['copy_GBps']:.0f} GB/s, bf16 {roof['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    if "memory" in ARGS.ops:
        bench_memory_ops(roof)
    if "indexer_topk" in ARGS.ops:
        bench_indexer(roof, gen)
        bench_indexer_ragged(roof, gen)
        bench_topk_methods(roof)
    if "sparse_attn" in ARGS.ops:
        bench_sparse_attn(roof, gen)
    write(roof, time.perf_counter() - t0)
    print(f"wrote {ARGS.out}/triton_attention.{{json,md}} in {time.perf_counter() - t0:.0f} s")
    if FAILURES:
        print(f"{len(FAILURES)} correctness failures:\n  " + "\n  ".join(FAILURES))
        sys.exit(1)


if __name__ == "__main__":
    main()

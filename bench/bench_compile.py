"""Compile the attention-side Triton kernels for sm_90 without a GPU (`bench/triton_attention.py --compile-sm90`).

Triton's frontend and the NVIDIA backend (with the wheel's own ptxas) run on any machine: each kernel is compiled
at the configurations the ops launch on an H100/H200 (the run-time launcher's specialization included: pointers
16-byte aligned, strides divisible by 16), and `cuobjdump -res-usage` reports registers, stack (register spills)
and shared memory. This catches what the CPU interpreter cannot (non-constexpr globals, compile-time shapes,
shared-memory overflow, spills) before any GPU time is spent.
"""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from parity.optimized.ops.triton import act_quant, compress_pool, fp4_fake_quant, hadamard, indexer_topk, sparse_attn


def _sig(text: str) -> dict:
    """ "name:type ..." -> a Triton signature dict."""
    return dict(item.split(":") for item in text.split())


ATTN_SIG = _sig(
    "q_ptr:*bf16 o_ptr:*bf16 idx_ptr:*i64 nblk_ptr:*i32 sink_ptr:*fp32 s0:*bf16 s1:*bf16 s2:*bf16 s3:*bf16 "
    "c1:i64 c2:i64 c3:i64 c4:i64 st0:i32 st1:i32 st2:i32 st3:i32 H:i32 K:i32 q_st:i32 q_sh:i32 idx_st:i32 "
    "scale:fp32 T_BUCKET:i32"
)
TOPK_SIG = _sig("sc_ptr:*fp32 out_ptr:*i64 L:i32 T:i32 K:i32 start_pos:i32 ratio:i32")
POOL_SIG = _sig("kv_ptr:*fp32 sc_ptr:*fp32 out_ptr:*fp32 N:i32 W:i32 C:i32 kv_sn:i32 kv_sw:i32 sc_sn:i32 sc_sw:i32")
SCORES_SIG = _sig(
    "q_ptr:*bf16 e_ptr:*bf16 w_ptr:*bf16 out_ptr:*fp32 L:i32 H:i32 T:i32 D:i32 q_sl:i32 q_sh:i32 e_st:i32 w_sl:i32 "
    "w_sh:i32"
)
FP8_SIG = _sig("x_ptr:*bf16 y_ptr:*fp8e4nv s_ptr:*u8 R:i32 NG:i32 x_row_stride:i32 y_row_stride:i32")
FP4_SIG = _sig("x_ptr:*bf16 R:i32 NG:i32 row_stride:i32")
HAD_SIG = _sig("x_ptr:*bf16 y_ptr:*bf16 R:i32 x_row_stride:i32 scale:fp32")
# sizes and counts: not specialized as multiples of 16 (strides and pointers are)
NOT_DIVISIBLE = {"H", "K", "T_BUCKET", "c1", "c2", "c3", "c4", "R", "NG", "N", "W", "C", "L", "T", "start_pos"}


def cases():
    """(name, kernel, signature, constexprs, num_warps, num_stages) at the ops' GPU launch configurations."""
    quant = dict(ROUND_SCALE=True, S_E8M0=True, SCALE_SHIFT=0)
    aq = act_quant._fp8_group_kernel
    yield "act_quant [T, 4096] e8m0", aq, FP8_SIG, dict(BLOCK=128, BR=1, BG=32, MODE=0, **quant), 4, 3
    kv = {**FP8_SIG, "y_ptr": "*bf16", "s_ptr": "*bf16"}
    yield "kv_fake_quant [T, 448]", aq, kv, dict(BLOCK=64, BR=8, BG=8, MODE=1, **quant), 4, 3
    fp4 = dict(BLOCK=32, BR=32, BG=4, SCALE_SHIFT=0)
    yield "fp4_fake_quant", fp4_fake_quant._fp4_group_kernel, FP4_SIG, fp4, 4, 3
    yield "hadamard d 128", hadamard._hadamard_kernel, HAD_SIG, dict(D=128, LOG_D=7, BR=16, REVERSED=False), 4, 3
    for w, bc in ((8, 256), (128, 16)):
        yield f"compress_pool w {w} d 512", compress_pool._pool_kernel, POOL_SIG, dict(WP=w, BN=1, BC=bc), 4, 3
    scores = dict(HP=64, DP=128, BR=1, BT=64, W_BF16=True)
    yield "indexer scores h 64", indexer_topk._scores_kernel, SCORES_SIG, scores, 4, 3
    yield "indexer top-k rank t <= 128", indexer_topk._topk_rank_kernel, TOPK_SIG, dict(TP=128, BR=1), 8, 3
    for kp in (512, 1024):
        yield f"indexer top-k merge k {kp}", indexer_topk._topk_merge_kernel, TOPK_SIG, dict(KP=kp, C=kp, BR=1), 4, 3
    for cfg in sparse_attn._sparse_attn_tuned.configs:
        consts = dict(D=512, DP=512, BN=64, **cfg.kwargs)
        name = f"sparse_attn d 512 BH {cfg.kwargs['BH']} warps {cfg.num_warps} stages {cfg.num_stages}"
        yield name, sparse_attn._sparse_attn_kernel, ATTN_SIG, consts, cfg.num_warps, cfg.num_stages


def compile_one(kernel, sig, consts, num_warps, num_stages) -> dict:
    names = kernel.arg_names
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if (v.startswith("*") or v in ("i32", "i64")) and k not in NOT_DIVISIBLE}  # fmt: skip
    src = ASTSource(fn=kernel, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    return dict(regs=int(m.group(1)), stack_bytes=int(m.group(2)), shared_bytes=c.metadata.shared)


def compile_report(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for name, kernel, sig, consts, warps, stages in cases():
        try:
            row = dict(kernel=name, **compile_one(kernel, sig, consts, warps, stages))
        except Exception as e:  # a kernel that does not compile is the finding
            failed += 1
            row = dict(kernel=name, error=f"{type(e).__name__}: {str(e)[-500:]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "compile_sm90.json").write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0

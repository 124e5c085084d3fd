"""Every Triton kernel compiles for sm_90 on any machine (`bench/sm90.py`: Triton's frontend and the wheel's ptxas
need no GPU): the attention side at the bench's configurations (`bench/triton_attention.py --compile-sm90`), the GEMM
side at every autotune configuration (`bench/triton_gemm.py --compile-check`). And the Gluon sparse_attn kernel,
which no CPU interpreter runs, lowers at every head dim it claims within one SM: its shared memory under sm_90's
227 KiB a block and no register spills (a spill is a local-memory round trip in every block of the loop)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from parity.optimized.ops.triton import sparse_attn_wgmma

REPO = Path(__file__).resolve().parents[3]
SM90_SHARED = 227 * 1024


def _patched(bench: str, patch: str) -> str:
    """`python -c` source running `bench` as __main__ after `patch` (which may take its own argument from argv[1];
    the bench's arguments follow). triton is imported first, as the benches do, or parity would choose the
    interpreter on a machine without a GPU."""
    run = f"runpy.run_path({bench!r}, run_name='__main__')"
    return f"import runpy, sys, triton; {patch}; sys.argv = ['bench'] + sys.argv[1:]; {run}"


# the attention bench with the Gluon kernel's head dims replaced (argv[1]: the dims)
WITH_DIMS = _patched(
    "bench/triton_attention.py",
    "from parity.optimized.ops.triton import sparse_attn_wgmma as k; "
    "k.DIMS = tuple(int(d) for d in sys.argv.pop(1).split(','))",
)
# the GEMM bench with fp8_gemm's first decode tile 48 wide (no power of two: tl.arange refuses it)
WITH_BAD_TILE = _patched(
    "bench/triton_gemm.py",
    "from parity.optimized.ops.triton import fp8_gemm; fp8_gemm._small.configs[0].kwargs['BLOCK_W'] = 48",
)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    # natively compiled: the interpreter's kernels cannot be lowered (an explicit TRITON_INTERPRET is kept by parity)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _compile(out: Path, *args: str, dims: str | None = None) -> subprocess.CompletedProcess:
    bench = ["-c", WITH_DIMS, dims] if dims else ["bench/triton_attention.py"]
    return _run(*bench, "--compile-sm90", *args, "--out", str(out))


def _gluon_problems(out: Path, dims) -> list:
    """What keeps the Gluon kernel from running at `dims`: rows that failed to compile, over shared memory or spilling,
    and any d without its row."""
    rows = {r["kernel"]: r for r in json.loads((out / "compile_sm90.json").read_text())}
    problems = []
    for d in dims:
        row = rows.get(f"sparse_attn_wgmma d {d}")
        if row is None or "error" in row or row["shared_bytes"] > SM90_SHARED or row["stack_bytes"] != 0:
            problems.append((d, row))
    return problems


def test_attention_kernels_compile_for_sm90(tmp_path):
    done = _compile(tmp_path)
    rows = json.loads((tmp_path / "compile_sm90.json").read_text())
    assert done.returncode == 0 and not [r for r in rows if "error" in r], done.stdout[-3000:] + done.stderr[-2000:]
    gluon = sorted(r["kernel"] for r in rows if r["kernel"].startswith("sparse_attn_wgmma"))
    assert gluon == sorted(f"sparse_attn_wgmma d {d}" for d in sparse_attn_wgmma.DIMS)
    assert not _gluon_problems(tmp_path, sparse_attn_wgmma.DIMS)


def test_a_head_dim_the_gluon_kernel_cannot_hold_is_caught(tmp_path):
    """Planted: d 1024 (q and two KV buffers are 384 KiB; P V's half of d is no wgmma N) fails the same checks, while
    d 64 beside it passes them."""
    done = _compile(tmp_path, "sparse_attn_wgmma", dims="64,1024")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert [d for d, _ in _gluon_problems(tmp_path, (64, 1024))] == [1024]


def test_a_name_no_kernel_has_is_refused_in_one_line(tmp_path):
    done = _compile(tmp_path, "no_such_kernel")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines() == [
        "--compile-sm90: no kernel's name contains 'no_such_kernel' (e.g. 'sparse_attn', 'hc_pre')"
    ]
    assert not (tmp_path / "compile_sm90.json").exists()


def _gemm_rows(stdout: str) -> tuple[list[str], str]:
    """The per-config lines of `--compile-check` and its closing count line."""
    lines = stdout.strip().splitlines()
    return [line for line in lines if " warps=" in line], lines[-1]


def test_gemm_kernels_compile_for_sm90_at_every_autotune_config():
    done = _run("bench/triton_gemm.py", "--compile-check")
    rows, last = _gemm_rows(done.stdout)
    assert done.returncode == 0 and not [r for r in rows if "FAILED" in r], done.stdout[-3000:] + done.stderr[-2000:]
    assert last == f"compile check: {len(rows)} kernel configs, 0 failed"
    ops = {"fp8_gemm", "fp4_gemm", "fp8_linear", "o_lora", "dense_linear", "moe _gate_up_kernel", "moe _down_kernel"}
    ops |= {"moe combine", "moe plan", "moe_gate route", "split-K reduction"}
    assert {op for op in ops if any(r.startswith(op) for r in rows)} == ops
    assert all(re.search(r"'regs': \d+, 'stack_bytes': \d+", r) for r in rows)


def test_a_gemm_config_that_cannot_compile_is_caught():
    """Planted: a decode tile 48 wide. Only the fused act_quant job uses that config; it fails, by name, exit 1."""
    done = _run("-c", WITH_BAD_TILE, "--compile-check", "fp8_linear")
    rows, last = _gemm_rows(done.stdout)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(rows) == 1 and rows[0].startswith("fp8_linear (fused act_quant)") and "'BLOCK_W': 48" in rows[0]
    assert "FAILED CompilationError" in rows[0] and "arange's range must be a power of 2" in done.stdout
    assert last == "compile check: 1 kernel configs, 1 failed"


def test_a_gemm_name_no_kernel_has_is_refused_in_one_line():
    done = _run("bench/triton_gemm.py", "--compile-check", "no_such_kernel")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines() == [
        "--compile-check: no kernel's name contains 'no_such_kernel' (e.g. 'fp8_gemm', 'moe')"
    ]

"""The attention-side kernels compile for sm_90 on any machine (`bench/triton_attention.py --compile-sm90`: Triton's
frontend and the wheel's ptxas need no GPU), and the Gluon sparse_attn kernel, which no CPU interpreter runs, lowers
at every head dim it claims within one SM: its shared memory under sm_90's 227 KiB a block and no register spills
(a spill is a local-memory round trip in every block of the loop)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from parity.optimized.ops.triton import sparse_attn_wgmma

REPO = Path(__file__).resolve().parents[3]
SM90_SHARED = 227 * 1024
# the bench with the Gluon kernel's head dims replaced (argv: the dims, then the bench's own arguments); triton is
# imported first, as the bench does, or parity would choose the interpreter on a machine without a GPU
WITH_DIMS = (
    "import runpy, sys, triton; from parity.optimized.ops.triton import sparse_attn_wgmma as k; "
    "k.DIMS = tuple(int(d) for d in sys.argv[1].split(',')); sys.argv = ['bench'] + sys.argv[2:]; "
    "runpy.run_path('bench/triton_attention.py', run_name='__main__')"
)


def _compile(out: Path, *args: str, dims: str | None = None) -> subprocess.CompletedProcess:
    # natively compiled: the interpreter's kernels cannot be lowered (an explicit TRITON_INTERPRET is kept by parity)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    bench = ["-c", WITH_DIMS, dims] if dims else ["bench/triton_attention.py"]
    cmd = [sys.executable, *bench, "--compile-sm90", *args, "--out", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


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


def test_a_prefix_no_kernel_has_is_refused_in_one_line(tmp_path):
    done = _compile(tmp_path, "no_such_kernel")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout.strip().splitlines() == [
        "--compile-sm90: no kernel's name starts with 'no_such_kernel' (e.g. 'sparse_attn', 'hc_pre')"
    ]
    assert not (tmp_path / "compile_sm90.json").exists()

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


def test_attention_kernels_compile_for_sm90(tmp_path):
    # natively compiled: the interpreter's kernels cannot be lowered (an explicit TRITON_INTERPRET is kept by parity)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/triton_attention.py", "--compile-sm90", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads((tmp_path / "compile_sm90.json").read_text())
    assert done.returncode == 0 and not [r for r in rows if "error" in r], done.stdout[-3000:] + done.stderr[-2000:]
    gluon = {r["kernel"]: r for r in rows if r["kernel"].startswith("sparse_attn_wgmma")}
    assert sorted(gluon) == sorted(f"sparse_attn_wgmma d {d}" for d in sparse_attn_wgmma.DIMS)
    for name, row in gluon.items():
        assert row["shared_bytes"] <= SM90_SHARED and row["stack_bytes"] == 0, (name, row)

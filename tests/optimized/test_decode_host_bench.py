"""`bench/decode_host.py` runs as printed (CPU-only: it is the host-work benchmark), and the requests it places
(`bench/placed.py`, shared with `bench/layer_speed.py --context`) make a decode step at their contexts."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_decode_host_bench_runs_a_decode_step_at_the_contexts(tmp_path):
    out = tmp_path / "host.json"
    cmd = [sys.executable, "bench/decode_host.py", "--batch", "3", "--context", "300", "--repeat", "2"]
    done = subprocess.run([*cmd, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert (row["batch"], row["context"]) == (3, 300)
    assert {"schedule", "batch", "compressor plan, ratio 4", "HCA lists"} <= row["ms"].keys()
    assert all(ms > 0 for ms in row["ms"].values()) and row["host_ms"] > 0


def test_decode_host_bench_refuses_a_context_shorter_than_its_batch():
    cmd = [sys.executable, "bench/decode_host.py", "--batch", "8", "--context", "4"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--context: at least the largest batch (8)" in done.stderr
    assert "Traceback" not in done.stderr


def test_layer_bench_refuses_a_negative_context(tmp_path):
    cmd = [sys.executable, "bench/layer_speed.py", "--smoke", "--out", str(tmp_path), "--context", "-1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--context: expected at least 0, got -1" in done.stderr
    assert "Traceback" not in done.stderr


def test_placed_requests_decode_after_their_contexts(tiny_ckpt):
    sys.path.insert(0, str(REPO))
    try:
        from bench.placed import place_decoding
    finally:
        sys.path.remove(str(REPO))
    import torch

    from parity.checkpoint import build_model
    from parity.optimized.engine import Engine, EngineConfig
    from parity.optimized.model import OptimizedTransformer

    model, _ = build_model(tiny_ckpt, factory=lambda a: OptimizedTransformer(a))
    engine = Engine(model, EngineConfig(max_requests=2, num_blocks=32))
    place_decoding(engine, [300, 131], 4, torch.Generator().manual_seed(0), fill=True)
    plan = engine._schedule()
    assert [(s.start, len(s.tokens), s.prefill) for s in plan] == [(300, 1, False), (131, 1, False)]
    assert [len(r.blocks[4]) for r in engine.running] == [-(-(300 // 4) // 16), -(-(131 // 4) // 16)]
    assert all(t.isfinite().all() for t in engine.cache.window)  # filled: no NaN poison left to read
    engine.step()
    assert all(len(r.output) == 2 for r in engine.running)


def test_layer_bench_refuses_a_profile_without_overlapped_rows(tmp_path):
    cmd = [sys.executable, "bench/layer_speed.py", "--smoke", "--out", str(tmp_path), "--pyprofile"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--pyprofile profiles the --overlap rows" in done.stderr
    assert "Traceback" not in done.stderr


def test_layer_bench_times_overlapped_steps(tmp_path):
    # `--overlap` rows run as printed: back to back, with the bytes their layers read and the roofline share;
    # `--pyprofile` writes their host profile
    cmd = [sys.executable, "bench/layer_speed.py", "--smoke", "--out", str(tmp_path), "--prefill", "--decode", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*cmd, "--overlap", "--breakdown", "--pyprofile"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "layer_speed.json").read_text())["rows"]
    (row,) = [r for r in rows if r["phase"] == "decode overlap"]
    b = row["breakdown"]
    assert row["size"] == 2 and row["median_ms"] > 0 and b["overlapped"] and b["bytes"] > 0
    assert 0 < b["pct_roofline_step"] < 100
    profile = (tmp_path / "pyprofile_overlap_2.txt").read_text()
    assert "Ordered by: internal time" in profile and "Ordered by: cumulative time" in profile

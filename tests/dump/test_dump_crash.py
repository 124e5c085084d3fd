"""A run killed while dumping leaves only whole files under their final names, and manifest lines that point at
them (at worst one cut-off last line, which the loader names)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from parity import dump
from parity.compare import load_dump
from parity.dump import writer
from parity.errors import ParityError

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys, torch
from torch import nn
from parity import dump
model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)])
dump.install(model, dump.DumpConfig(dir=sys.argv[1], modules=r"^\\d+$"))
step = 0
while True:
    with dump.phase("decode", step=step, batch=4):
        model(torch.randn(4, 37, 64))
    step += 1
"""


def test_sigkill_mid_dump_leaves_no_half_file(tmp_path):
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], cwd=ROOT)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not manifest.exists() or manifest.read_text().count("\n") < 30):
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert manifest.read_text().count("\n") >= 30
    # every file under its final name is whole (temporary files are hidden dot-files, never listed in a manifest)
    for path in (out / "tensors").glob("[!.]*.safetensors"):
        with safe_open(path, "pt") as f:
            assert all(f.get_tensor(k).shape == (4, 37, 64) for k in f.keys())
    try:
        d = load_dump(out)
    except ParityError as e:
        assert "cut off mid-line" in str(e)
        text = manifest.read_text()
        manifest.write_text(text[: text.rindex("\n") + 1])
        d = load_dump(out)
    assert len(d.records) >= 30 and all(d.load(r).shape == (4, 37, 64) for r in d.records)


def test_failed_tensor_write_leaves_neither_file_nor_manifest_line(tmp_path, monkeypatch):
    def half_then_die(tensors, path):
        Path(path).write_bytes(b"\x00" * 16)
        raise KeyboardInterrupt

    model = nn.Sequential(nn.Linear(3, 3))
    # the hooks queue, a writer thread writes: its error comes out of the next write or, here, the handle's close
    with pytest.raises(KeyboardInterrupt):
        with dump.install(model, dump.DumpConfig(dir=tmp_path, modules="^0$")) as handle:
            model(torch.randn(2, 3))
            handle.writer.flush()
            monkeypatch.setattr(writer, "save_file", half_then_die)
            model(torch.randn(2, 3))
    assert len(list((tmp_path / "tensors").iterdir())) == 1
    assert [r.call for r in load_dump(tmp_path).records] == [0]


def test_each_rank_writes_its_own_dir(tmp_path, monkeypatch):
    from parity.dump import hooks

    for rank in range(2):
        monkeypatch.setattr(hooks, "_rank", lambda rank=rank: (rank, 2))
        model = nn.Sequential(nn.Linear(3, 3))
        with dump.install(model, dump.DumpConfig(dir=tmp_path, modules="^0$")), dump.phase("prefill"):
            model(torch.full((1, 3), float(rank)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    d = load_dump(tmp_path)
    assert d.world_size == 2 and [(r.rank, r.world_size) for r in d.records] == [(0, 2), (1, 2)]

"""The background writer: the same files and manifest lines as the synchronous one (readers read both), a bounded
queue, everything queued on disk when the handle closes, the process exits or the forward raises."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from parity import dump
from parity.compare import load_dump
from parity.dump import stats, writer
from parity.dump.stats import CHUNK, tensor_stats
from parity.dump.tags import Tags
from parity.dump.writer import DumpWriter, Site

ROOT = Path(__file__).resolve().parents[2]


def _tensors(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {
        "out.0": torch.randn(3, 5, generator=g).bfloat16(),
        "out.1": torch.randn(4, generator=g).t(),
        "idx": torch.randint(0, 9, (2, 3), generator=g),
        "empty": torch.zeros(0, 4),
    }


def _write(root: Path, background: bool, mode: str = "full", **kw) -> Path:
    w = DumpWriter(root, mode, background=background, **kw)
    for i in range(5):
        site = Site(f"layers.{i}", "Block", i, f"layers.{i}")
        w.write_activation(site, Tags("decode", i, batch=3), i, 0, "output", _tensors(i))
    w.close()
    return root


def _lines(root: Path) -> list[dict]:
    lines = [json.loads(s) for s in (root / "manifest.jsonl").read_text().splitlines()]
    for obj in lines:  # the execution counter and the file names (which hold it) differ between two writers
        obj.pop("seq"), obj.pop("file", None)
    return lines


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_background_writes_what_the_synchronous_writer_writes(tmp_path, mode):
    sync, bg = _write(tmp_path / "sync", False, mode), _write(tmp_path / "bg", True, mode)
    assert _lines(sync) == _lines(bg)
    ds, db = load_dump(sync), load_dump(bg)
    if mode == "full":
        files = lambda root: sorted((root / "tensors").iterdir())
        for fs, fb in zip(files(sync), files(bg), strict=True):
            assert fs.read_bytes() == fb.read_bytes()  # byte for byte: the on-disk format is unchanged
        for rs, rb in zip(ds.records, db.records, strict=True):
            assert torch.equal(ds.load(rs).view(torch.uint8), db.load(rb).view(torch.uint8))


def test_queue_stays_within_its_bytes(tmp_path, monkeypatch):
    held, save = [], writer.save_file

    def watch(tensors, path):
        held.append(pipe.held)
        save(tensors, path)

    monkeypatch.setattr(writer, "save_file", watch)
    w = DumpWriter(tmp_path, "full", background=True, queue_bytes=200)
    pipe = w._pipe
    site = Site("layers.0", "Block", 0, "layers.0")
    for i in range(20):
        w.write_activation(site, Tags("decode", i), i, 0, "output", {"out": torch.full((30,), float(i))})  # 120 B
    w.close()
    assert len(held) == 20 and max(held) <= 200
    assert [float(load_dump(tmp_path).load(r)[0]) for r in load_dump(tmp_path).records] == [float(i) for i in range(20)]


def test_snapshot_is_taken_at_the_hook_not_when_written(tmp_path):
    w = DumpWriter(tmp_path, "full", background=True)
    t = torch.zeros(1000)
    site = Site("layers.0", "Block", 0, "layers.0")
    for i in range(3):
        t.fill_(i)  # the model reuses its buffer right after the hook
        w.write_activation(site, Tags("decode", i), i, 0, "output", {"out": t})
    t.fill_(99)
    w.close()
    d = load_dump(tmp_path)
    assert [d.load(r).unique().tolist() for r in d.records] == [[0.0], [1.0], [2.0]]


CHILD = """
import sys, torch
from torch import nn
from parity import dump
model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
dump.install(model, dump.DumpConfig(dir=sys.argv[1], modules=r"^\\d+$"))  # never removed
for step in range(10):
    with dump.phase("decode", step=step):
        model(torch.randn(2, 8))
"""


def test_queue_drains_when_the_process_exits_without_remove(tmp_path):
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, check=True, timeout=120)
    assert len(load_dump(tmp_path).records) == 40


def test_queue_drains_when_the_forward_raises(tmp_path):
    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("kernel failed")

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), Boom())
    with pytest.raises(RuntimeError, match="kernel failed"):
        with dump.install(model, dump.DumpConfig(dir=tmp_path, modules=r"^[01]$")), dump.phase("prefill"):
            model(torch.randn(3, 4))
    assert [r.name for r in load_dump(tmp_path).records] == ["0:out", "1:out"]


def test_a_failed_background_write_refuses_later_writes(tmp_path, monkeypatch):
    def fail(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "save_file", fail)
    w = DumpWriter(tmp_path, "full", background=True)
    site = Site("layers.0", "Block", 0, "layers.0")
    w.write_activation(site, Tags("decode", 0), 0, 0, "output", {"out": torch.ones(3)})
    with pytest.raises(OSError, match="No space left"):
        w.flush()
    with pytest.raises(dump.writer.ParityError, match="a dump write failed earlier"):
        w.write_activation(site, Tags("decode", 1), 1, 0, "output", {"out": torch.ones(3)})
    assert not (tmp_path / "manifest.jsonl").exists() and not list((tmp_path / "tensors").glob("*"))


def _reference_stats(t: torch.Tensor) -> dict:
    """Plain float64 stats written here: exactly rounded sums (math.fsum), two-pass variance."""
    x = t.double().reshape(-1)
    v = x[x.isfinite()].tolist()
    n = len(v)
    mean = math.fsum(v) / n if n else None
    return {
        "numel": t.numel(),
        "nan": int(x.isnan().sum()),
        "inf": int(x.isinf().sum()),
        "zeros": int((x == 0).sum()),
        "min": min(v) if n else None,
        "max": max(v) if n else None,
        "mean": mean,
        "std": math.sqrt(math.fsum((a - mean) ** 2 for a in v) / n) if n else None,
        "absmax": max(map(abs, v)) if n else None,
        "l2": math.sqrt(math.fsum(a * a for a in v)) if n else 0.0,
    }


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda g: torch.randn(300, 70, generator=g).bfloat16(), id="bf16"),
        pytest.param(lambda g: 1e6 + 1e-3 * torch.randn(5000, generator=g, dtype=torch.float64), id="mean>>std"),
        pytest.param(lambda g: torch.tensor([1.0, math.nan, -math.inf, 0.0, 0.0, -2.5]), id="nan-inf-zeros"),
        pytest.param(lambda g: torch.tensor([math.nan, math.inf]), id="no-finite"),
        pytest.param(lambda g: torch.zeros(0, 3), id="empty"),
        pytest.param(lambda g: torch.randn(40000, generator=g).to(torch.float8_e4m3fn), id="fp8-multi-tile"),
        pytest.param(lambda g: 10.0 ** torch.randint(-150, 150, (999,), generator=g).double(), id="dynamic-range"),
        # the compiled loop's chunks (`stats.CHUNK`): several, one of them holding a NaN (the torch form takes that
        # one), negative values and signed zeros (its ordered-bits minimum), fp16 subnormals
        pytest.param(lambda g: _nan_in_second_chunk(torch.randn(2 * CHUNK + 77, generator=g)), id="fp32-chunks-nan"),
        pytest.param(lambda g: torch.randn(CHUNK + 3, generator=g).bfloat16(), id="bf16-two-chunks"),
        pytest.param(
            lambda g: torch.cat([-(torch.rand(3000, generator=g) + 0.5), torch.tensor([-0.0, 0.0])]).half(),
            id="fp16-negative-signed-zeros",
        ),  # fmt: skip
        pytest.param(lambda g: (torch.rand(5000, generator=g) * 2**-20).half(), id="fp16-subnormals"),
    ],
)
@pytest.mark.parametrize("form", ["compiled", "torch", "device", "cuda"])
def test_one_pass_stats_match_plain_float64(make, form, monkeypatch):
    t = make(torch.Generator().manual_seed(0))
    if form == "torch":  # what runs without numba, or for other dtypes
        monkeypatch.setattr(stats, "_compiled_loop", lambda flat: None)
    if form == "device":  # GPU tensors' pass (`device_sums`), run here on the CPU in tiles of 1000 elements
        monkeypatch.setattr(stats, "DEVICE_TILE", 1000)
        got = stats.from_sums(t.numel(), stats.device_sums(t).tolist())
    elif form == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device; this machine has none")
        got = tensor_stats(t.cuda())
    else:
        got = tensor_stats(t)
    assert_stats_close(got, _reference_stats(t), t.numel())


def assert_stats_close(got: dict, want: dict, numel: int) -> None:
    n = max(numel, 1)
    gamma = n * 2.0**-53 / (1 - n * 2.0**-53)  # any float64 summation order is within gamma * Σ|terms|
    for k, w in want.items():
        g = got[k]
        if w is None or isinstance(w, int) or k in ("min", "max", "absmax"):
            assert g == w, k
        elif k == "mean":
            assert abs(g - w) <= gamma * (want["absmax"] or 0) + 4 * 2.0**-53 * abs(w), k
        else:
            assert abs(g - w) <= (gamma + 8 * 2.0**-53) * w, (k, g, w)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_background_stats_of_gpu_tensors_are_summed_on_the_device(tmp_path, device, monkeypatch):
    # the writer thread gets the nine sums of `device_sums`, not a copy of the tensor; on the CPU the same path runs
    # with CPU tensors taken for device ones
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; this machine has none")
    if device == "cpu":
        monkeypatch.setattr(writer, "sums_on_device", lambda t: True)
    summed = []  # the tensors that took `device_sums` (a writer that copied them out would leave this short)
    monkeypatch.setattr(writer, "device_sums", lambda t: summed.append(t.shape) or stats.device_sums(t))
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(300, 70, generator=g).bfloat16(), torch.tensor([1.0, math.nan, -math.inf, 0.0]),
          torch.zeros(0, 3), 1e6 + 1e-3 * torch.randn(5000, generator=g, dtype=torch.float64)]  # fmt: skip
    w = DumpWriter(tmp_path, "stats", background=True)
    site = Site("layers.0", "Block", 0, "layers.0")
    for i, t in enumerate(ts):
        w.write_activation(site, Tags("decode", i), i, 0, "output", {"out": t.to(device)})
    w.close()
    records = load_dump(tmp_path).records
    assert len(records) == len(ts)
    for r, t in zip(records, ts):
        assert r.shape == tuple(t.shape) and r.dtype == str(t.dtype).removeprefix("torch.")
        assert_stats_close(r.stats, _reference_stats(t), t.numel())
    assert summed == [t.shape for t in ts]


def _nan_in_second_chunk(t: torch.Tensor) -> torch.Tensor:
    t[CHUNK + 10] = math.nan
    t[CHUNK + 11] = -math.inf
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_floating_cpu_tensors_take_the_compiled_loop(dtype):
    # the compiled loop is the fast path of stats mode (numba is a dependency): were its import to fail, the stats
    # would still be right (the torch form, above) but slow, which this test would not otherwise notice
    assert stats._compiled_loop(torch.zeros(4, dtype=dtype)) is not None

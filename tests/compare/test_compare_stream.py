"""Streamed pairs (read tile by tile from their files) measure exactly what the whole-tensor path measures, on any
number of threads; bisect's early stop reads nothing after the first failing activation."""

import io
import math
import struct

import pytest
import torch

from parity.compare import Dump, bisect, compare_dumps, compare_tensors, diff, fused, load_dump, stream
from parity.compare.gate import Thresholds
from parity.compare.workers import run_ordered

SHAPES = {
    "layers.0.attn:out": (5, 3, 7),
    "layers.0.ffn:out": (2, 300),
    "layers.1.attn:out": (129,),
    "layers.1.ffn:out": (4, 2, 3, 5),
    "layers.2.attn:out": (1, 1),
}


@pytest.fixture
def small_tiles(monkeypatch):
    # a few elements per tile and a few tiles per segment: rows split over tiles and segments, ragged last ones
    monkeypatch.setattr(fused, "TILE", 13)
    monkeypatch.setattr(fused, "COMPILED_TILE", 13)
    monkeypatch.setattr(stream, "SEGMENT", 64)


@pytest.fixture
def no_whole_loads(monkeypatch):
    """Proof that the streamed path ran: loading a whole tensor fails the test."""

    def refuse(self, record):
        raise AssertionError(f"{record.name} was loaded whole")

    monkeypatch.setattr(Dump, "load", refuse)


def _pair(tmp_path, write_dump, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    a = {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}
    b = {k: (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(dtype) for k, t in a.items()}
    b["layers.1.attn:out"] = a["layers.1.attn:out"].clone()  # bitwise equal
    b["layers.1.ffn:out"].view(-1)[-1] = math.nan
    b["layers.2.attn:out"] = a["layers.2.attn:out"] * 2  # fails the norm ratio
    return write_dump(tmp_path / "a", a), write_dump(tmp_path / "b", b), a, b


# light pairs run on the calling thread, the others on the workers (`workers.run_ordered`): all on the workers (0),
# a mix (the records of SHAPES hold 2 to 1200 bytes: 250 splits them), all light (the default for records this small)
LIGHT = [pytest.param(1, None, id="1-thread"), pytest.param(2, 0, id="2-workers"),
         pytest.param(2, 250, id="2-mixed"), pytest.param(2, None, id="2-light")]  # fmt: skip


@pytest.mark.parametrize(("threads", "light_bytes"), LIGHT)
def test_streamed_metrics_equal_whole_tensor_metrics(
    tmp_path, write_dump, small_tiles, no_whole_loads, threads, light_bytes, monkeypatch
):
    if light_bytes is not None:
        monkeypatch.setattr(diff, "LIGHT_BYTES", light_bytes)
    pa, pb, a, b = _pair(tmp_path, write_dump)
    t = Thresholds(atol=0.1)
    results = compare_dumps(load_dump(pa), load_dump(pb), thresholds=t, threads=threads)
    assert [r.name for r in results] == list(SHAPES)
    for r in results:
        # the same tiles in the same order: bitwise the same floats
        assert r.metrics == compare_tensors(a[r.name], b[r.name], atol=0.1), r.name
    assert results[2].metrics.bitwise and results[3].metrics.nan_b == 1
    assert [r.status for r in results] == ["pass", "pass", "pass", "fail", "fail"]


def test_mixed_dtypes_stream_too(tmp_path, write_dump, small_tiles, no_whole_loads):
    pa, _, a, _ = _pair(tmp_path, write_dump)
    pb = write_dump(tmp_path / "f32", {k: t.float() * 1.001 for k, t in a.items()})
    for r in compare_dumps(load_dump(pa), load_dump(pb)):
        assert r.metrics == compare_tensors(a[r.name], a[r.name].float() * 1.001), r.name


@pytest.mark.parametrize(("threads", "light_bytes"), LIGHT)
def test_stop_at_first_failure_leaves_the_rest_unmeasured(
    tmp_path, write_dump, small_tiles, no_whole_loads, threads, light_bytes, monkeypatch
):
    if light_bytes is not None:
        monkeypatch.setattr(diff, "LIGHT_BYTES", light_bytes)
    pa, pb, _, _ = _pair(tmp_path, write_dump)
    full = compare_dumps(load_dump(pa), load_dump(pb))
    short = compare_dumps(load_dump(pa), load_dump(pb), stop_at_first_failure=True, threads=threads)
    assert [r.name for r in short] == list(SHAPES)[:4] and short[-1].status == "fail"
    assert bisect(short).first.name == bisect(full).first.name == "layers.1.ffn:out"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiles_wider_than_the_read_buffers_are_cut_to_fit(tmp_path, write_dump, monkeypatch, dtype):
    # read buffers of 64 bytes and tiles of 13 elements: a float64 tile (104 bytes) would not fit, so it is cut (a
    # tile read into a short buffer came back short, reported as a truncated file); the metrics stay those of the
    # whole tensors within float64 summation order
    monkeypatch.setattr(fused, "TILE", 13)
    monkeypatch.setattr(fused, "COMPILED_TILE", 13)
    monkeypatch.setattr(stream, "SEGMENT", 64)
    monkeypatch.setattr(stream, "BUFFER", 64)
    pa, pb, a, b = _pair(tmp_path, write_dump, dtype)
    for r in compare_dumps(load_dump(pa), load_dump(pb)):
        want = compare_tensors(a[r.name], b[r.name])
        for field in ("cos", "max_abs", "max_rel", "rel_l2", "norm_ratio"):
            assert getattr(r.metrics, field) == pytest.approx(getattr(want, field), rel=1e-12, nan_ok=True), field


def test_truncated_file_after_loading_is_a_parity_error(tmp_path, write_dump, small_tiles):
    from parity.errors import ParityError

    pa, pb, _, _ = _pair(tmp_path, write_dump)
    da, db = load_dump(pa), load_dump(pb)
    path = pb / db.records[1].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ParityError, match="file ends inside a tensor"):
        compare_dumps(da, db)


def test_each_byte_is_read_once_when_records_fit_a_segment(tmp_path, write_dump, monkeypatch):
    # the segment compared bitwise (and found to differ) is the one the metrics pass starts with: not read twice
    pa, pb, _, _ = _pair(tmp_path, write_dump)
    da, db = load_dump(pa), load_dump(pb)
    read = []

    class Counting(io.FileIO):
        def readinto(self, b):
            k = super().readinto(b)
            read.append(k)
            return k

    def counted(path, mode, buffering=-1):  # the data reads (unbuffered); headers are read through builtin open
        return Counting(path, mode) if buffering == 0 else open(path, mode, buffering)

    monkeypatch.setattr(stream, "open", counted, raising=False)
    compare_dumps(da, db)
    itemsize = torch.empty(0, dtype=torch.bfloat16).element_size()
    assert sum(read) == 2 * itemsize * sum(math.prod(s) for s in SHAPES.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by the coordinator on the H200)")
@pytest.mark.parametrize("segments", ["default", "small"])
@pytest.mark.parametrize("light_bytes", [0, 250], ids=["2-workers", "2-mixed"])
def test_cuda_device_measures_what_the_cpu_measures(tmp_path, write_dump, monkeypatch, segments, light_bytes):
    if segments == "small":
        # many segments per record: the pinned buffers are refilled while earlier copies may still be queued
        monkeypatch.setattr(stream, "GPU_SEGMENT", 64)
        monkeypatch.setattr(stream, "GPU_TILE", 13)
    # every pair on the workers' own streams, or the light ones on the calling thread's
    monkeypatch.setattr(diff, "LIGHT_BYTES", light_bytes)
    pa, pb, _, _ = _pair(tmp_path, write_dump)
    da, db = load_dump(pa), load_dump(pb)
    cpu = compare_dumps(da, db, thresholds=Thresholds(atol=0.1))
    gpu = compare_dumps(da, db, thresholds=Thresholds(atol=0.1), device="cuda", threads=2)
    for c, g in zip(cpu, gpu, strict=True):
        # other tile sizes, other summation order: the same values within float64 summation error
        assert (c.status, c.metrics.bitwise, c.metrics.nan_b, c.metrics.max_abs) == (
            g.status,
            g.metrics.bitwise,
            g.metrics.nan_b,
            g.metrics.max_abs,
        )
        assert c.metrics.mismatches == g.metrics.mismatches and c.metrics.max_rel == g.metrics.max_rel
        for k in ("cos", "rel_l2", "rel_diff", "norm_ratio"):
            assert getattr(g.metrics, k) == pytest.approx(getattr(c.metrics, k), rel=1e-12, abs=1e-14), (c.name, k)


@pytest.mark.parametrize("threads", [1, 2])
def test_light_pairs_are_measured_on_the_cpu_whatever_the_device(threads):
    # a light pair's work on a GPU is mostly launches and syncs (`workers` docstring): even with `device="cuda"` it
    # runs on a CPU worker, so no CUDA worker is made (making one fails on a machine without a GPU)
    got = run_ordered(range(5), lambda i, item, worker: worker.device.type, threads, "cuda", light=lambda _: True)
    assert list(got) == ["cpu"] * 5


def test_a_header_made_unreadable_after_loading_is_a_parity_error(tmp_path, write_dump, small_tiles):
    # the streamed path reads each file's header again (the loader checked it): a length rewritten to 2^62 must not
    # allocate or crash there; the pair falls to the whole-tensor path, which names the file
    from parity.errors import ParityError

    pa, pb, _, _ = _pair(tmp_path, write_dump)
    da, db = load_dump(pa), load_dump(pb)
    path = pb / db.records[1].file
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    with pytest.raises(ParityError, match=str(path.name)):
        compare_dumps(da, db)

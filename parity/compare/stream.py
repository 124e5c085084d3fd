"""Compare one record pair straight from its safetensors files, tile by tile, in bounded memory.

A record's bytes are read in segments (whole tiles, at most `SEGMENT` bytes) into buffers reused for every record,
so memory stays at a few segments per worker whatever the record size, and nothing is allocated per record.

Identical records cost a byte comparison: segments are compared bitwise first, and only NaN/Inf are counted on
them. At the first segment that differs, the fused metrics pass starts over from the first segment (the equal prefix is
read again, from the page cache; the segment just compared is not read again when the pass starts with it, the usual
case). A pair that cannot be streamed (memory dumps, rank shards, layouts to line up, dtypes this reader does not know)
returns None and is compared from whole tensors by the caller.

Device: `cuda` runs the fused pass on the GPU: each worker has its own CUDA stream (workers on other threads do not
queue behind each other's kernels and copies on the default stream), larger segments and tiles (fewer launches and
host syncs per byte), and segments read into pinned host buffers, copied without blocking the host, the buffer
refilled only once its copy is done. Written for the H200 and measured there by the coordinator (docs/perf.md).
"""

import contextlib
import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from parity.compare.fused import Buffers, FusedPass, Tiling, tile_for
from parity.compare.loader import Dump
from parity.compare.metrics import TensorMetrics, metrics_of, nonfinite_counts, words
from parity.dump.format import Record, dtype_name
from parity.errors import ParityError

# bytes read per segment (whole tiles, at least one): a few syscalls of page-cache copy, and small enough that the
# tile pass finds what was just read in the cache (a CPU worker's pair of 2 MiB segments stays in L2/L3: 3.47
# against 2.79 GB per CPU-second with 8 MiB segments, 2 x 2 GB of bf16 records in one process, this 2-core EPYC VM)
SEGMENT = 2 << 20
# bytes of each raw read buffer: a segment, or one tile of the widest dtype when a tile is larger
BUFFER = 8 << 20
# on a GPU: a 16 MiB segment (pinned, per side and worker: 256 MiB of host memory for 8 workers) and tiles of up to
# 8 Mi elements (512 MiB of float64 buffers per worker), so that per-tile launches and host syncs are rare against
# the bytes moved
GPU_SEGMENT = 16 << 20
GPU_TILE = 1 << 23

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class Worker:
    """One worker's reusable state: raw segment buffers (two sides), the float64 tile buffers and, on a GPU, its
    own CUDA stream."""

    def __init__(self, device: str = "cpu"):
        self.device = torch.device(device)
        gpu = self.device.type == "cuda"
        self.segment, self.tile = (GPU_SEGMENT, GPU_TILE) if gpu else (SEGMENT, None)
        self.capacity = GPU_SEGMENT if gpu else BUFFER
        self.raw = [torch.empty(self.capacity, dtype=torch.uint8, pin_memory=gpu) for _ in range(2)]
        self.buffers = Buffers(self.device)
        self.stream = torch.cuda.Stream(self.device) if gpu else None
        self.copied = None  # on a GPU: the event after the last copies out of `raw`

    def scope(self):
        """The context the worker's arithmetic runs in: its CUDA stream on a GPU."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


def stream_metrics(
    da: Dump, ra: Record, db: Dump, rb: Record, token_dims: int, atol: float | None, rtol: float, worker: Worker
) -> TensorMetrics | None:
    """The metrics of a pair of single-file records of one shape, or None if this pair cannot be streamed."""
    if da.memory is not None or db.memory is not None or ra.shape != rb.shape:
        return None
    opened = [_open(da, ra), _open(db, rb)]
    if None in opened:
        for o in opened:
            if o is not None:
                o[0].close()
        return None
    (fa, sa), (fb, sb) = opened
    itemsize = max(sa.itemsize, sb.itemsize)
    # a tile is read whole into the worker's buffers: no larger than they hold in the wider dtype (a GPU worker's
    # 8 Mi-element tiles of fp32 are twice its 16 MiB buffers)
    tile = min(worker.tile or tile_for(sa.dtype, sb.dtype), worker.capacity // itemsize)
    tiling = Tiling(ra.shape, token_dims, tile)
    segments = _segments(tiling, itemsize, min(worker.segment, worker.capacity))
    with fa, fb, worker.scope():
        reader = _Reader(fa, sa, fb, sb, worker)
        if sa.dtype == sb.dtype:
            counts, equal = _bitwise(reader, segments)
            if equal:
                exact = dict(cos=1.0, max_abs=0.0, max_rel=0.0, rel_l2=0.0, rel_diff=0.0, norm_ratio=1.0)
                nan, inf = counts
                mism = None if atol is None else 0
                counts = dict(nan_a=nan, nan_b=nan, inf_a=inf, inf_b=inf)
                return TensorMetrics(numel=tiling.numel, bitwise=True, mismatches=mism, **counts, **exact)
        fp = FusedPass(tiling, atol, rtol, worker.buffers)
        for first, count, tiles in segments:
            a, b = reader.read(first, count)
            for row, col, rows, cols, start in tiles:
                n = rows * cols
                fp.add(a[start : start + n], b[start : start + n], row, col, rows, cols)
        # on the worker's stream too: the last sums are read on the stream that wrote them
        return metrics_of(fp, numel=tiling.numel, bitwise=False)


class _Where:
    """A tensor's bytes in a safetensors file: path, absolute offset, dtype."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype):
        self.path, self.offset, self.dtype, self.itemsize = path, offset, dtype, dtype.itemsize


def _open(dump: Dump, record: Record) -> tuple[BinaryIO, _Where] | None:
    """The record's file, open (unbuffered: the reader reads whole segments into its own buffers), and where its
    tensor lies in it, from the safetensors header (the loader checked the file); None if it cannot be streamed.
    One open per file: a decode step's records are a few KiB each, where the opens were a fifth of the work."""
    if record.file is None:
        return None
    path = dump.root / record.file
    try:
        f = open(path, "rb", buffering=0)
    except OSError:
        return None  # the whole-tensor path reports the problem by name
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(n)).get(record.key)
        dtype = _DTYPES.get(entry.get("dtype")) if isinstance(entry, dict) else None
        if dtype is None or dtype_name(dtype) != record.dtype or tuple(entry.get("shape", ())) != record.shape:
            f.close()
            return None
        return f, _Where(path, 8 + n + entry["data_offsets"][0], dtype)
    except (OSError, ValueError, struct.error, KeyError, TypeError, MemoryError, OverflowError):
        f.close()  # a header made unreadable after loading (a huge length, bad JSON): the whole-tensor path says it
        return None


def _segments(tiling: Tiling, itemsize: int, segment: int) -> list[tuple[int, int, list[tuple]]]:
    """Consecutive tiles grouped into segments of at most `segment` bytes: `(first, count, tiles)` with `first` the
    segment's first flat element and each tile `(row, col, rows, cols, start)`, `start` its offset in the segment."""
    per = max(tiling.tile, segment // itemsize)
    out, cur, size, first = [], [], 0, 0
    for row, col, rows, cols in tiling.tiles():
        n = rows * cols
        if cur and size + n > per:
            out.append((first, size, cur))
            cur, size, first = [], 0, tiling.offset(row, col)
        cur.append((row, col, rows, cols, size))
        size += n
    if cur:
        out.append((first, size, cur))
    return out


class _Reader:
    """Reads the same element range of both sides into the worker's two raw buffers."""

    def __init__(self, fa, sa: _Where, fb, sb: _Where, worker: Worker):
        self.sides = ((fa, sa, worker.raw[0]), (fb, sb, worker.raw[1]))
        self.worker = worker
        self.last = None  # (first, count, a, b) of the last read: asked again at once, it is not read again

    def read(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements [first, first + count) of both sides, flat in their dtypes (views of the reused buffers, or
        their copies on the GPU)."""
        if self.last is not None and self.last[:2] == (first, count):
            return self.last[2], self.last[3]
        w = self.worker
        if w.copied is not None:
            w.copied.synchronize()  # the raw buffers are still being copied to the GPU: wait before refilling
        out = []
        for f, where, raw in self.sides:
            nbytes = count * where.itemsize
            f.seek(where.offset + first * where.itemsize)
            view = memoryview(raw.numpy())[:nbytes]
            got = 0
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise ParityError(f"{where.path}: file ends inside a tensor (changed after it was loaded?)")
                got += k
            t = raw[:nbytes].view(where.dtype)
            out.append(t if w.stream is None else t.to(w.device, non_blocking=True))
        if w.stream is not None:
            w.copied = torch.cuda.Event()
            w.copied.record(w.stream)
        self.last = (first, count, out[0], out[1])
        return out[0], out[1]


def _bitwise(reader: _Reader, segments) -> tuple[tuple[int, int], bool]:
    """Byte-compare segments in order, stopping at the first that differs: ((NaN, Inf) counts, all equal)."""
    nan = inf = 0
    for first, count, _ in segments:
        a, b = reader.read(first, count)
        if not torch.equal(words(a.view(torch.uint8)), words(b.view(torch.uint8))):
            return (nan, inf), False
        n, f = nonfinite_counts(a)
        nan, inf = nan + n, inf + f
    return (nan, inf), True

"""The process's resident memory over a run, and the line a streamed run prints about it.

Peak RSS comes from the kernel's high-water mark (`VmHWM` in /proc/self/status, anonymous and file-backed pages
alike), reset when the measured span starts (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), so writing a
synthetic checkpoint before the run does not count. Where the reset is refused, a thread samples `VmRSS` every
few milliseconds instead (a lower bound: a spike shorter than the period can slip between two samples).
"""

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
GiB = 2**30
MiB = 2**20


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss() -> int:
    """Current resident set size in bytes (0 where /proc is absent)."""
    return (_status_kib("VmRSS") or 0) * 1024


class PeakRSS:
    """`with PeakRSS() as p: ...` then `p.start` (RSS when the span began), `p.peak` (the span's peak) and
    `p.method` ("VmHWM" or "sampled")."""

    def __init__(self, period_s: float = 0.005):
        self.period_s = period_s
        self.start = self.peak = 0
        self.method = "sampled"
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        self.start = rss()
        try:
            _CLEAR_REFS.write_text("5")
            self.method = "VmHWM"
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss())
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled, rss())
        else:
            peak = (_status_kib("VmHWM") or 0) * 1024
        # The RSS the span began with is part of the span. The high-water mark alone can end below it: the kernel
        # updates it lazily, so pages dropped between `start` and the reset (page cache reclaimed, a free) leave a
        # mark a few pages under `start` (seen in CI: 60 KiB under on a 1 GiB process).
        self.peak = max(peak, self.start)


@dataclass
class StreamMemory:
    """What a streamed run held, in bytes: `peak` RSS of the run, `start` RSS before it (Python, torch, and the
    `imports` the first model build makes, done before the start: code, not data), the largest `block` (one layer's
    weights, e.g. `layers.2`), the `resident` weights (embedding, head, norms: one copy, shared by the run's
    models), the run's activations: the `captures` (every run's records, held for the verdict), one model's
    `buffers` (KV caches, state, RoPE tables) and the largest GEMM temporary, `decoded` (the reference kernels
    decode a weight to float64 for the call), and the reads."""

    peak: int
    start: int
    block: int
    block_name: str
    resident: int
    captures: int
    buffers: int
    decoded: int
    loads: int
    read_bytes: int
    read_s: float
    method: str
    imports: int = 0

    @property
    def activations(self) -> int:
        return self.captures + self.buffers + self.decoded

    @property
    def added(self) -> int:
        return self.peak - self.start

    @property
    def bound(self) -> int:
        """What the acceptance allows above the start: two blocks' weights, the resident weights, activations."""
        return 2 * self.block + self.resident + self.activations

    @property
    def layers(self) -> float:
        """The run's peak over the resident weights and activations, in layers' weights (the bound allows 2)."""
        return (self.added - self.resident - self.activations) / self.block if self.block else float("inf")

    def within(self) -> bool:
        return self.added <= self.bound

    def to_dict(self) -> dict:
        return {**asdict(self), "activations": self.activations, "added": self.added, "bound": self.bound,
                "layers": self.layers, "within": self.within()}  # fmt: skip

    def line(self) -> str:
        m = lambda n: f"{n / MiB:.0f} MiB"  # noqa: E731
        return (
            f"stream: peak RSS {self.peak / GiB:.2f} GiB ({self.method}), {self.start / GiB:.2f} GiB before the run "
            f"({m(self.imports)} of it the first model build's one-time imports); the run added {m(self.added)} "
            f"{'<=' if self.within() else '>'} bound {m(self.bound)} = 2 x one layer's weights ({m(self.block)}, "
            f"{self.block_name}) + resident weights {m(self.resident)} + activations {m(self.activations)} "
            f"(captures {m(self.captures)}, buffers {m(self.buffers)}, largest GEMM weight decoded to float64 "
            f"{m(self.decoded)}): {self.layers:.2f} x one layer over resident + activations; {self.loads} block "
            f"reads, {self.read_bytes / GiB:.1f} GiB in {self.read_s:.1f}s"
        )

"""Write dump records: tensors first (atomic tmp + rename), then their manifest lines (one append + fsync).

A run killed at any point leaves every manifest line pointing at a complete file. The only partial state a kill
can leave is a cut-off last manifest line, which the loader rejects by name (see `parity.compare.loader`).

With `background=True` (what `install` uses) the forward only takes the snapshot (a copy into a pooled buffer; on
CUDA an async copy into pinned memory) and queues it; a writer thread writes the queued file sets in batches: every
tensor file of a batch to its temporary name, each fsynced once, renamed, then the batch's manifest lines in one
append + fsync. The queue is bounded by `queue_bytes` of snapshots (the forward waits when it is full), so memory
stays bounded whatever the dump size. Stats mode summarises the snapshots on the writer thread. An error on the
writer thread is raised by the next write or by `close()`; nothing queued after it is written.
"""

import atexit
import itertools
import json
import os
import queue
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from parity.dump.format import MANIFEST, TENSOR_DIR, WEIGHT_DIR, Record, Tags, dtype_name, merge_rule, record_name
from parity.dump.stats import device_sums, from_sums, sums_on_device, tensor_stats
from parity.errors import ParityError
from parity.io import atomic_write

# snapshot bytes a background writer holds at once, queued plus pooled for reuse (the forward waits beyond it):
# the memory bound of dumping
QUEUE_BYTES = 512 << 20
# file sets written between two manifest appends, at most
BATCH = 64

# one id and one sequence counter per process: records from several installs in the same process (the model, then
# an MTP drafter built later) share one execution order and never collide on file names
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
_SEQ = itertools.count()


@dataclass(frozen=True, slots=True)
class Site:
    """A hooked module: its path, class, and the layer id / layer block derived from the path."""

    path: str
    cls: str
    layer: int | None
    block: str | None
    merge: str | dict | None = None  # the module's declared rank merge rule(s) (`format.MERGE_ATTR`)


class DumpWriter:
    """Appends records to one dump dir (`<dir>/rank<r>` when torch.distributed runs more than one rank)."""

    background = False

    def __init__(
        self,
        root: str | os.PathLike,
        mode: str,
        rank: int = 0,
        world_size: int = 1,
        *,
        background: bool = False,
        queue_bytes: int = QUEUE_BYTES,
    ):
        self.dir = Path(root) / f"rank{rank}" if world_size > 1 else Path(root)
        self.mode, self.rank, self.world_size = mode, rank, world_size
        self._check_fresh()
        if background:
            self.background = True
            self._pipe = _Pipeline(self, queue_bytes)

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    def write_activation(
        self, site: Site, tags: Tags, call: int, call_in_step: int, io: str, tensors: dict[str, torch.Tensor]
    ) -> None:
        """One hook call: `tensors` are the flattened inputs or outputs, keyed by field name (`out.0`)."""
        if not tensors:
            return
        seq = next(_SEQ)
        common = dict(
            seq=seq,
            run=RUN_ID,
            kind="activation",
            module=site.path,
            cls=site.cls,
            layer=site.layer,
            block=site.block,
            io=io,
            call=call,
            call_in_step=call_in_step,
            **tags.as_record_fields(),
        )
        rel = f"{TENSOR_DIR}/{RUN_ID}-{seq:08d}.safetensors"
        fields = lambda f: {**common, "name": record_name(site.path, f), "field": f, "merge": merge_rule(site.merge, f)}
        self._write(rel, tensors, fields)

    def write_weights(self, group: str, tensors: dict[str, tuple[torch.Tensor, Site]]) -> None:
        """Parameters and buffers of one layer block (`group`), keyed by their full name in the model."""
        if not tensors:
            return
        seq = next(_SEQ)
        safe = group.replace("/", "_") or "_root"

        def tags(name: str) -> dict:
            site = tensors[name][1]
            module, _, leaf = name.rpartition(".")
            return dict(
                seq=seq,
                run=RUN_ID,
                kind="weight",
                name=name,
                module=module,
                field=leaf,
                cls=site.cls,
                layer=site.layer,
                block=site.block,
                merge=merge_rule(site.merge, leaf),
            )

        self._write(f"{WEIGHT_DIR}/{RUN_ID}-{safe}.safetensors", {k: t for k, (t, _) in tensors.items()}, tags)

    def _write(self, rel: str, tensors: dict[str, torch.Tensor], tags_of) -> None:
        if self.background:
            self._pipe.put(rel, tensors, tags_of)
            return
        records = []
        if self.mode == "full":
            # clone on the way out: implementations edit tensors in place after the hook returns
            snap = {k: _snapshot(t) for k, t in tensors.items()}
            self._store(rel, snap)
            for k, t in snap.items():
                records.append(self._record(tags_of(k), t, file=rel, key=k))
        else:
            for k, t in tensors.items():
                records.append(self._record(tags_of(k), t, stats=tensor_stats(t)))
        self._append(records)

    def flush(self) -> None:
        """Wait until everything queued is on disk (a no-op for a synchronous writer); re-raise a writer error."""
        if self.background:
            self._pipe.flush()

    def close(self) -> None:
        """Flush, then stop the writer thread. Writes after it are synchronous."""
        if self.background:
            self.background = False
            self._pipe.close()

    def _store(self, rel: str, snap: dict[str, torch.Tensor]) -> None:
        atomic_write(self.dir / rel, lambda tmp: save_file(snap, tmp))

    def _record(self, tags: dict, t: torch.Tensor, **where) -> Record:
        return Record(
            shape=tuple(t.shape), dtype=dtype_name(t.dtype), rank=self.rank, world_size=self.world_size, **tags, **where
        )

    def _append(self, records: list[Record]) -> None:
        data = "".join(json.dumps(r.to_json(), allow_nan=False, separators=(",", ":")) + "\n" for r in records)
        view = memoryview(data.encode())
        # one O_APPEND write per hook call: a kill leaves whole lines, or at worst one cut-off last line
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _check_fresh(self) -> None:
        """Refuse to mix runs: a manifest left by another process makes compare pair stale records with new ones."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            return
        with open(self.manifest, "rb") as f:
            first = f.readline()
        try:
            run = json.loads(first).get("run")
        except (ValueError, AttributeError):
            run = None
        if run != RUN_ID:
            raise ParityError(f"{self.manifest} holds a dump from another run; point PARITY_DUMP_DIR at an empty dir")


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy in the tensor's own dtype (always a copy, also for tensors already on the CPU)."""
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


class _Pipeline:
    """The bounded queue and writer thread of a background `DumpWriter`."""

    def __init__(self, writer: DumpWriter, budget: int):
        self.writer, self.budget = writer, budget
        self.held = 0  # snapshot bytes queued or being written
        self.cond = threading.Condition()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None  # raised once on the caller's thread
        self.failed: BaseException | None = None  # kept: every later write is refused
        self.pool = _Pool(lambda: self.budget - self.held)
        self.thread = threading.Thread(target=self._run, name="parity-dump-writer", daemon=True)
        self.thread.start()
        # a process that ends without `remove()` still gets its queued records (daemon threads die at exit)
        ref = weakref.ref(self)
        self._exit = lambda: (p := ref()) is not None and p.close(raise_error=False)
        atexit.register(self._exit)

    def put(self, rel: str, tensors: dict[str, torch.Tensor], tags_of) -> None:
        self._raise()
        # stats mode on a GPU: the sums are made on the device, on the forward's stream (`device_sums`), and only
        # their nine numbers are copied out; `meta` keeps the tensor's shape and dtype for the record
        meta = {
            k: torch.empty(t.shape, dtype=t.dtype, device="meta")
            for k, t in tensors.items()
            if self.writer.mode == "stats" and sums_on_device(t)
        }
        tensors = {k: device_sums(t) if k in meta else t for k, t in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        with self.cond:
            # one oversized set may go alone; otherwise wait for room
            self.cond.wait_for(lambda: self.held == 0 or self.held + nbytes <= self.budget or self.error is not None)
            self._raise()
            self.held += nbytes
        snap = {k: self.pool.snapshot(t) for k, t in tensors.items()}
        # tags now (they read the caller's context); stats and shapes are filled in by the writer thread
        tags = {k: tags_of(k) for k in tensors}
        self.jobs.put((rel, snap, tags, nbytes, meta))

    def flush(self) -> None:
        done = threading.Event()
        self.jobs.put(done)
        while not done.wait(0.1):
            if not self.thread.is_alive():
                break
        self._raise()

    def close(self, raise_error: bool = True) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        atexit.unregister(self._exit)
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            self.failed, self.error = self.error, None
            raise self.failed
        if self.failed is not None:
            raise ParityError(f"{self.writer.dir}: a dump write failed earlier ({self.failed!r}); nothing more written")

    def _run(self) -> None:
        while True:
            batch, stop, marks = [], False, []
            job = self.jobs.get()
            while True:
                if job is None:
                    stop = True
                elif isinstance(job, threading.Event):
                    marks.append(job)
                else:
                    batch.append(job)
                if stop or len(batch) >= BATCH:
                    break
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
            if batch and self.error is None and self.failed is None:
                try:
                    self._write_batch(batch)
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    self.error = e
            self._release(batch)
            for mark in marks:
                mark.set()
            if stop:
                return

    def _write_batch(self, batch) -> None:
        w = self.writer
        for _, snap, *_ in batch:
            self.pool.ready(snap)
        if w.mode == "full":
            _store_files(w.dir, [(rel, snap) for rel, snap, *_ in batch])
        records = []
        for rel, snap, tags, _, meta in batch:
            for k, t in snap.items():
                if w.mode == "full":
                    records.append(w._record(tags[k], t, file=rel, key=k))
                elif k in meta:
                    records.append(w._record(tags[k], meta[k], stats=from_sums(meta[k].numel(), t.tolist())))
                else:
                    records.append(w._record(tags[k], t, stats=tensor_stats(t)))
        w._append(records)

    def _release(self, batch) -> None:
        with self.cond:
            self.held -= sum(job[3] for job in batch)
        for _, snap, *_ in batch:
            self.pool.give_back(snap)
        with self.cond:
            self.cond.notify_all()


class _Pool:
    """Snapshot buffers reused across records (no fresh pages to fault in per record): plain CPU memory, or pinned
    memory for CUDA tensors, copied into asynchronously and synchronised on the writer thread before use."""

    def __init__(self, room):
        self.free: dict[tuple[int, bool], list[torch.Tensor]] = {}
        self.room, self.kept = room, 0  # room(): the budget left by the snapshots in flight
        self.lock = threading.Lock()
        self.events: dict[int, object] = {}

    def snapshot(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        nbytes, cuda = t.numel() * t.element_size(), t.device.type == "cuda"
        with self.lock:
            bufs = self.free.get((nbytes, cuda))
            raw = bufs.pop() if bufs else None
            if raw is not None:
                self.kept -= nbytes
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        out = raw.view(t.dtype).view(t.shape) if nbytes else torch.empty(t.shape, dtype=t.dtype)
        if nbytes:
            out.copy_(t, non_blocking=cuda)
        if cuda:
            # the writer thread waits on this event, not the forward (verified on a GPU by the coordinator only)
            event = torch.cuda.Event()
            event.record()
            self.events[id(out)] = event
        return out

    def ready(self, snap: dict[str, torch.Tensor]) -> None:
        for t in snap.values():
            event = self.events.pop(id(t), None)
            if event is not None:
                event.synchronize()

    def give_back(self, snap: dict[str, torch.Tensor]) -> None:
        for t in snap.values():
            nbytes = t.numel() * t.element_size()
            if not nbytes:
                continue
            raw = t.reshape(-1).view(torch.uint8)
            with self.lock:
                if self.kept + nbytes <= self.room():
                    self.free.setdefault((nbytes, raw.is_pinned()), []).append(raw)
                    self.kept += nbytes


def _store_files(root: Path, sets: list[tuple[str, dict[str, torch.Tensor]]]) -> None:
    """Each file set to a temporary name, then one fsync each (the disk writes them back together), then renamed:
    a kill leaves only whole files under final names, and the manifest lines come after."""
    tmps: list[tuple[str, Path]] = []
    try:
        for rel, snap in sets:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmps.append((tmp, path))
            save_file(snap, tmp)
        for tmp, _ in tmps:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        while tmps:
            tmp, path = tmps[0]
            os.replace(tmp, path)
            tmps.pop(0)
    except BaseException:
        for tmp, _ in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


class MemoryWriter(DumpWriter):
    """The same records, kept in this process instead of a dir: `records` in execution order and `tensors` keyed by
    (file, key), as `parity.compare.Dump.from_memory` reads them. `parity run` captures both sides this way and
    writes them out only when asked (`--dump`)."""

    def __init__(self, mode: str = "full"):
        self.dir, self.mode, self.rank, self.world_size = None, mode, 0, 1
        self.records: list[Record] = []
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}

    def _store(self, rel: str, snap: dict[str, torch.Tensor]) -> None:
        self.tensors.update({(rel, k): t for k, t in snap.items()})

    def _append(self, records: list[Record]) -> None:
        self.records.extend(records)

    def save(self, root: str | os.PathLike) -> Path:
        """Write the records out as a dump dir (`root` must not hold a manifest yet)."""
        return save_records(root, self.records, self.tensors)


def save_records(root: str | os.PathLike, records: list[Record], tensors: dict[tuple[str, str], torch.Tensor]) -> Path:
    """A dump dir holding `records`, their tensors (keyed by (file, key)) written file by file, atomically."""
    out = DumpWriter(root, "full")
    if out.manifest.exists():
        raise ParityError(f"{out.manifest}: already exists; give an empty dir")
    files: dict[str, dict[str, torch.Tensor]] = {}
    for r in records:
        files.setdefault(r.file, {})[r.key] = tensors[(r.file, r.key)]
    for rel, group in files.items():
        out._store(rel, {k: t.contiguous() for k, t in group.items()})
    out._append(list(records))
    return out.dir

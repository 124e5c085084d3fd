"""Write dump records: tensors first (atomic tmp + rename), then their manifest lines (one append + fsync).

A run killed at any point leaves every manifest line pointing at a complete file. The only partial state a kill
can leave is a cut-off last manifest line, which the loader rejects by name (see `parity.compare.loader`).
"""

import itertools
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from parity.dump.format import MANIFEST, TENSOR_DIR, WEIGHT_DIR, Record, dtype_name, record_name
from parity.dump.stats import tensor_stats
from parity.dump.tags import Tags
from parity.errors import ParityError
from parity.io import atomic_write

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


class DumpWriter:
    """Appends records to one dump dir (`<dir>/rank<r>` when torch.distributed runs more than one rank)."""

    def __init__(self, root: str | os.PathLike, mode: str, rank: int = 0, world_size: int = 1):
        self.dir = Path(root) / f"rank{rank}" if world_size > 1 else Path(root)
        self.mode, self.rank, self.world_size = mode, rank, world_size
        self._check_fresh()

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
            **tags.record_fields(),
        )
        rel = f"{TENSOR_DIR}/{RUN_ID}-{seq:08d}.safetensors"
        self._write(rel, tensors, lambda f: {**common, "name": record_name(site.path, f), "field": f})

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
            )

        self._write(f"{WEIGHT_DIR}/{RUN_ID}-{safe}.safetensors", {k: t for k, (t, _) in tensors.items()}, tags)

    def _write(self, rel: str, tensors: dict[str, torch.Tensor], tags_of) -> None:
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

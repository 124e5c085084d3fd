"""Read a dump dir written by `parity.dump` (or anything that writes the same format) and check it fully.

`load_dump` validates every manifest line and every tensor file header before any number is compared, so a bad
dump fails with one `ParityError` that names the file, the manifest line and the field, never halfway through a
report. A manifest whose last line was cut off by a killed run is rejected too (rather than silently dropping the
record): the message says which line to delete to use the records before it.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from parity.dump.format import MANIFEST, SAFETENSORS_DTYPES, Record, dtype_name
from parity.errors import ParityError

Progress = Callable[[int, int], None]


@dataclass
class Dump:
    """The records of one dump dir (all ranks), in manifest order, with lazy access to their tensors."""

    root: Path
    records: list[Record]
    world_size: int
    _where: dict[int, str] = field(default_factory=dict, repr=False)
    # tensors of an in-memory dump (`parity.dump.MemoryWriter`), keyed by (file, key); None for a dump dir
    memory: dict[tuple[str, str], torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_memory(cls, writer, name: str) -> "Dump":
        """The records a `MemoryWriter` holds, readable like a dump dir (`name` stands in for the dir in messages)."""
        return cls(Path(name), list(writer.records), 1, {}, writer.tensors)

    def where(self, record: Record) -> str:
        """`DIR/manifest.jsonl line N`, for messages."""
        return self._where.get(id(record), str(self.root))

    def load(self, record: Record) -> torch.Tensor:
        """The record's tensor, checked against its manifest line. Stats-mode records have none."""
        if record.file is None:
            raise ParityError(f"{self.where(record)}: {record.name} was dumped in stats mode and holds no tensor")
        if self.memory is not None:
            return self.memory[(record.file, record.key)]
        path = self.root / record.file
        try:
            with safe_open(path, "pt") as f:
                t = f.get_tensor(record.key) if record.key in f.keys() else None
        except (SafetensorError, OSError) as e:
            msg = f"not a readable safetensors file: {_first_line(e)}"
            raise ParityError(f"{path} ({self.where(record)}): {msg}") from None
        if t is None:
            raise ParityError(f"{path} ({self.where(record)}): has no tensor {record.key!r}")
        if tuple(t.shape) != record.shape or dtype_name(t.dtype) != record.dtype:
            raise ParityError(
                f"{path} ({self.where(record)}): tensor {record.key!r} is {dtype_name(t.dtype)} {list(t.shape)} "
                f"in the file but {record.dtype} {list(record.shape)} in the manifest"
            )
        return t


def load_dump(path: str | Path, on_progress: Progress | None = None) -> Dump:
    """Read `path/manifest.jsonl` (or `path/rank*/manifest.jsonl`) and check every tensor file's header."""
    root = Path(path)
    if not root.is_dir():
        raise ParityError(f"{root}: no such dump dir" if not root.exists() else f"{root}: not a directory")
    try:
        entries = sorted(p.name for p in root.iterdir())
    except OSError as e:
        raise ParityError(f"{root}: cannot read the dump dir ({e.strerror})") from None
    rank_dirs = [n for n in entries if re.fullmatch(r"rank\d+", n) and (root / n).is_dir()]
    if MANIFEST in entries and rank_dirs:
        raise ParityError(
            f"{root}: holds both {MANIFEST} and rank dirs ({', '.join(rank_dirs)}): two dumps in one dir; give one"
        )
    # a rank dir without its manifest is read (and refused with the reason) rather than skipped
    manifests = [root / MANIFEST] if MANIFEST in entries else [root / n / MANIFEST for n in rank_dirs]
    if not manifests:
        raise ParityError(f"{root}: no {MANIFEST} here (not a parity dump dir)")
    records, where = [], {}
    for manifest in manifests:
        prefix = manifest.parent.relative_to(root)
        # execution order is `seq`: two installs in one process (a model and its MTP drafter) have a writer thread
        # each, and their batches reach the shared manifest in whichever order the threads finish
        for record, loc in sorted(_read_manifest(manifest), key=lambda r: r[0].seq):
            if record.file is not None and prefix != Path("."):
                record = replace(record, file=str(prefix / record.file))
            records.append(record)
            where[id(record)] = loc
    if not records:
        raise ParityError(f"{root}: {MANIFEST} holds no records")
    dump = Dump(root, records, _world_size(records, where), where)
    _check_ranks(dump, per_rank_dirs=len(manifests) > 1 or manifests[0].parent != root)
    _check_unique(dump)
    _check_files(dump, on_progress)
    return dump


# the manifest's counters and indices: a negative one is a damaged line, not a record to align
_COUNTS = ("seq", "step", "call", "call_in_step", "layer", "batch", "rank")


def _check_tags(r: Record, where: str) -> None:
    """The layout tags agree with each other: one request id and one start position per sequence, positions >= 0
    (rows are addressed by them: a short list would silently drop rows, a negative position invent them)."""
    n = len(r.cu_seqlens) - 1 if r.cu_seqlens is not None else r.batch
    for name in ("requests", "start_pos"):
        value = getattr(r, name)
        if value is not None and n is not None and len(value) != n:
            raise ParityError(f"{where}: field {name!r} has {len(value)} entries for {n} sequences")
    if r.start_pos is not None and any(p < 0 for p in r.start_pos):
        raise ParityError(f"{where}: field 'start_pos' must be >= 0, got {list(r.start_pos)}")
    # string tests, what `Path(file)` would say on POSIX (the manifest's paths are "/"-separated): ~20 us a record
    if r.file is not None and (r.file.startswith("/") or ".." in r.file.split("/")):
        raise ParityError(f"{where}: field 'file' must be a path inside the dump dir, got {r.file!r}")


def _read_manifest(manifest: Path):
    try:
        text = manifest.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ParityError(f"{manifest}: cannot read ({_first_line(e)})") from None
    lines = text.split("\n")
    # a whole file ends with "\n", so the last piece is empty; anything else is the line a killed run was writing
    tail = lines.pop()
    if tail:
        lines.append(tail)
    for n, line in enumerate(lines, start=1):
        where = f"{manifest} line {n}"
        try:
            obj = json.loads(line)
        except ValueError:
            cut = tail and n == len(lines)
            msg = "cut off mid-line (a killed run?); delete it to use the records above" if cut else "not valid JSON"
            raise ParityError(f"{where}: {msg}") from None
        record = Record.from_json(obj, where)
        negative = next((f for f in _COUNTS if isinstance(getattr(record, f), int) and getattr(record, f) < 0), None)
        if negative is not None:
            raise ParityError(f"{where}: field {negative!r} must be >= 0, got {getattr(record, negative)}")
        if record.world_size < 1:
            raise ParityError(f"{where}: field 'world_size' must be >= 1, got {record.world_size}")
        _check_tags(record, where)
        yield record, where


def _world_size(records: list[Record], where: dict[int, str]) -> int:
    sizes = {r.world_size for r in records}
    if len(sizes) > 1:
        odd = next(r for r in records if r.world_size != records[0].world_size)
        raise ParityError(f"{where[id(odd)]}: world_size {odd.world_size} differs from {records[0].world_size} above")
    size = sizes.pop()
    bad = next((r for r in records if not 0 <= r.rank < size), None)
    if bad is not None:
        raise ParityError(f"{where[id(bad)]}: rank {bad.rank} is outside world_size {size}")
    return size


def _check_ranks(dump: Dump, per_rank_dirs: bool) -> None:
    """Every rank of the world size must have written records: a dump missing a rank is incomplete, and comparing
    what is left would pass on half the data."""
    present = {r.rank for r in dump.records}
    missing = [r for r in range(dump.world_size) if r not in present]
    if missing:
        what = ", ".join(f"rank{r}/{MANIFEST}" if per_rank_dirs else f"rank {r}" for r in missing)
        raise ParityError(
            f"{dump.root}: incomplete dump: world_size {dump.world_size} but no records from {what} "
            f"(present: ranks {sorted(present)})"
        )


def _check_unique(dump: Dump) -> None:
    seen: dict[tuple, Record] = {}
    for r in dump.records:
        key = (*r.ident, r.rank)
        if key in seen:
            raise ParityError(
                f"{dump.where(r)}: {r.name} (phase {r.phase}, step {r.step}, call {r.call_in_step}) is already at "
                f"{dump.where(seen[key])}; give each installed model its own prefix"
            )
        seen[key] = r


def _check_files(dump: Dump, on_progress: Progress | None) -> None:
    """Open every tensor file once: it must exist, be complete, and hold each key with the manifest's shape."""
    by_file: dict[str, list[Record]] = {}
    for r in dump.records:
        if r.file is not None:
            by_file.setdefault(r.file, []).append(r)
    for i, (rel, recs) in enumerate(by_file.items()):
        path = dump.root / rel
        first = dump.where(recs[0])
        if path.is_dir():
            raise ParityError(f"{path} ({first}): is a directory, expected a safetensors file")
        try:
            with safe_open(path, "pt") as f:
                keys = set(f.keys())
                headers = {r.key: f.get_slice(r.key) for r in recs if r.key in keys}
                headers = {k: (tuple(h.get_shape()), h.get_dtype()) for k, h in headers.items()}
        except FileNotFoundError:
            raise ParityError(f"{path} ({first}): missing") from None
        except PermissionError as e:
            raise ParityError(f"{path} ({first}): cannot read ({e.strerror})") from None
        except (SafetensorError, OSError) as e:
            raise ParityError(f"{path} ({first}): not a readable safetensors file: {_first_line(e)}") from None
        for r in recs:
            if r.key not in keys:
                raise ParityError(f"{path} ({dump.where(r)}): has no tensor {r.key!r}")
            shape, st_dtype = headers[r.key]
            if shape != r.shape:
                raise ParityError(
                    f"{path} ({dump.where(r)}): tensor {r.key!r} has shape {list(shape)} in the file "
                    f"but {list(r.shape)} in the manifest"
                )
            dtype = SAFETENSORS_DTYPES.get(st_dtype, st_dtype)
            if dtype != r.dtype:
                raise ParityError(
                    f"{path} ({dump.where(r)}): tensor {r.key!r} has dtype {dtype} in the file "
                    f"but {r.dtype} in the manifest"
                )
        if on_progress is not None:
            on_progress(i + 1, len(by_file))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

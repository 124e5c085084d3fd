"""Write the runs of a verdict out as dump dirs, and read them back to judge again (`parity judge`).

    DIR/run.json        what judging needs besides the records: request layout, layer count, the case
    DIR/reference/      the reference in the engine's step layout: one record per engine record, holding the
                        reference's rows at the same (request, position)
    DIR/forced/         the engine teacher-forced at every site (own errors); absent when a decode-exact run was
                        bitwise without it
    DIR/chained/        the engine on its own (accumulated errors)
    DIR/golden/         the float64 golden in the engine's layout, when the run computed it

Because the reference is laid out like the engine, `parity compare DIR/reference DIR/forced` and `parity bisect`
line up record for record; rows the reference has no value for (rejected speculative tokens) hold the engine's own
values there and are listed in the record's `extra["skip_rows"]`, as in the engine's own record.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path

from parity.compare.loader import Dump, load_dump
from parity.compare.rows import RowStore, calls
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import RequestLayout
from parity.dump.format import TENSOR_DIR
from parity.dump.writer import save_records
from parity.errors import ParityError
from parity.io import atomic_write_json, read_json

RUN_FILE = "run.json"
SCHEMA = 1


def relayout(source: Dump, like: Dump, n_layers: int, name: str) -> tuple[list, dict]:
    """`source`'s rows in `like`'s records: (records, tensors) for `save_records`."""
    store = RowStore.from_dump(source, n_layers)
    records, tensors = [], {}
    for call in calls(like, n_layers):
        for f, rec in call.records.items():
            t = like.load(rec)
            if f != call.site.site.rows_field:
                t, _ = store.gather(call.path, f, call.keys, t)
            file = f"{TENSOR_DIR}/{name}-{rec.seq:08d}.safetensors"
            records.append(replace(rec, file=file, run=name))
            tensors[(file, rec.key)] = t
    return records, tensors


def save_run(c, root: str | Path, noise: NoiseModel) -> Path:
    """Write the captures of one run (`parity.run.Captures`) under `root` (which must be empty or new)."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ParityError(f"{root}: --dump needs an empty or new dir")
    # the engine runs share one schedule: either one's records give the reference its layout
    like = c.forced.dump if c.forced is not None else c.chained.dump
    if c.forced is not None:
        save_records(root / "forced", c.forced.dump.records, c.forced.dump.memory)
    save_records(root / "chained", c.chained.dump.records, c.chained.dump.memory)
    save_records(root / "reference", *relayout(c.reference.dump, like, c.n_layers, "reference"))
    if c.golden is not None:
        save_records(root / "golden", *relayout(c.golden.dump, like, c.n_layers, "golden"))
    layout = {k: [v.prompt_len, v.first_chunk] for k, v in c.layout.items()}
    meta = {"schema": SCHEMA, "n_layers": c.n_layers, "layout": layout, "noise": noise.source, "exact": noise.exact}
    atomic_write_json(root / RUN_FILE, meta)
    return root


@dataclass
class SavedRun:
    root: Path
    n_layers: int
    layout: dict[str, RequestLayout]
    exact: bool
    reference: Dump
    forced: Dump | None
    chained: Dump
    golden: Dump | None


def load_run(root: str | Path) -> SavedRun:
    """Read a dir written by `save_run`; every problem is one `ParityError` naming the file and field."""
    root = Path(root)
    if not root.exists():
        raise ParityError(f"{root}: no such dir (expected one written by `parity run --dump`)")
    if not root.is_dir():
        raise ParityError(f"{root}: not a directory (expected a dir written by `parity run --dump`)")
    path = root / RUN_FILE
    meta = read_json(path, f"{path}: missing (not a dir written by `parity run --dump`)", f"{path}: not readable JSON")
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise ParityError(f"{path}: expected an object with schema {SCHEMA}")
    n_layers, layout = meta.get("n_layers"), meta.get("layout")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ParityError(f"{path}: field 'n_layers' must be a positive int, got {n_layers!r}")
    ok = isinstance(layout, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        for v in layout.values()
    )
    if not ok:
        raise ParityError(f"{path}: field 'layout' must map request ids to [prompt_len, first_chunk]")
    bad = next((k for k, (p, c) in layout.items() if not 1 <= c <= p), None)
    if bad is not None:
        raise ParityError(
            f"{path}: field 'layout' request {bad!r}: expected 1 <= first_chunk <= prompt_len, got {layout[bad]}"
        )
    exact = meta.get("exact", False)
    if not isinstance(exact, bool):
        raise ParityError(f"{path}: field 'exact' must be true or false, got {exact!r}")
    reference = load_dump(root / "reference")
    _check_meta(path, n_layers, layout, reference)
    golden = load_dump(root / "golden") if (root / "golden").is_dir() else None
    forced = load_dump(root / "forced") if (root / "forced").is_dir() else None
    chained = load_dump(root / "chained")
    _check_aligned(reference, forced if forced is not None else chained)
    return SavedRun(
        root,
        n_layers,
        {k: RequestLayout(*v) for k, v in layout.items()},
        exact,
        reference,
        forced,
        chained,
        golden,
    )


_LAYER = re.compile(r"^layers\.(\d+)\.")


def _check_meta(path: Path, n_layers: int, layout: dict, reference: Dump) -> None:
    """run.json must describe the records it came with: `n_layers` the blocks the reference holds, `layout` its
    requests (each with its first chunk, the span the engine ran from position 0). A wrong value would judge every
    row under another phase, threshold or block, and an unknown request could not be judged at all."""
    layers = {int(m.group(1)) for r in reference.records if (m := _LAYER.match(r.name))}
    if layers and max(layers) + 1 != n_layers:
        raise ParityError(f"{path}: field 'n_layers' is {n_layers} but {reference.root} holds layers 0..{max(layers)}")
    first: dict[str, int] = {}
    for r in reference.records:
        if r.requests is None or r.start_pos is None or r.cu_seqlens is None:
            continue
        for i, (req, pos) in enumerate(zip(r.requests, r.start_pos)):
            if pos == 0 and req not in first:
                first[req] = r.cu_seqlens[i + 1] - r.cu_seqlens[i]
    seen = {req for r in reference.records for req in (r.requests or ())}
    if seen != set(layout):
        extra, gone = sorted(seen - set(layout)), sorted(set(layout) - seen)
        raise ParityError(
            f"{path}: field 'layout' lists requests {sorted(layout)} but {reference.root} holds {sorted(seen)}"
            + (f" (not in layout: {extra})" if extra else f" (no records: {gone})")
        )
    bad = next((k for k, (_, chunk) in layout.items() if k in first and first[k] != chunk), None)
    if bad is not None:
        raise ParityError(
            f"{path}: field 'layout' request {bad!r}: first_chunk {layout[bad][1]} but its first span in "
            f"{reference.root} (from position 0) is {first[bad]} tokens"
        )


def _check_aligned(reference: Dump, like: Dump) -> None:
    """The reference was saved in the engine's layout, record for record (`relayout`): a record it lacks is a
    damaged or partial dump, whose rows would otherwise go unjudged."""
    have = {r.ident for r in reference.records}
    gone = next((r for r in like.records if r.ident not in have), None)
    if gone is not None:
        n = sum(1 for r in like.records if r.ident not in have)
        raise ParityError(
            f"{reference.root}: no record {gone.name} (phase {gone.phase}, step {gone.step}) of {like.where(gone)}"
            f"{f' and {n - 1} more' if n > 1 else ''}: the saved reference is incomplete"
        )

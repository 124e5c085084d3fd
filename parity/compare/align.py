"""Line up the records of two dumps: rename through the name map, select, and pair by
(kind, name, phase, step, call within the step), per rank when both ran with the same world size and with the
ranks merged (shard rules of the name map) when they did not.

Pairs come out in side a's execution order, then what only side b has, so walking them in order walks the run.
"""

import re
from dataclasses import dataclass

import torch

from parity.compare.loader import Dump
from parity.compare.metrics import bitwise_equal
from parity.compare.namemap import NameMap, Shard
from parity.dump.config import Ranges
from parity.dump.format import Record
from parity.errors import ParityError


@dataclass(frozen=True, slots=True)
class Selection:
    """Which records take part; unset fields select everything."""

    phases: frozenset[str] | None = None
    steps: Ranges | None = None
    layers: Ranges | None = None
    name: str | None = None

    def __post_init__(self):
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as e:
                raise ParityError(f"name regex {self.name!r}: not a valid regex ({e})") from None

    def __call__(self, r: Record, name: str) -> bool:
        return (
            (self.phases is None or r.phase in self.phases)
            and (self.steps is None or r.step in self.steps)
            and (self.layers is None or r.layer in self.layers)
            and (self.name is None or re.search(self.name, name) is not None)
        )


@dataclass(frozen=True, slots=True)
class Pair:
    """One aligned tensor: its records on each side (one per rank when ranks are merged; empty when missing)."""

    name: str
    a: tuple[Record, ...]
    b: tuple[Record, ...]
    merged: bool = False  # the two dumps ran with different world sizes: each side holds every rank's record

    @property
    def head(self) -> Record:
        """The record that names the pair in reports (side a's, else side b's)."""
        return (self.a or self.b)[0]

    @property
    def missing(self) -> str | None:
        return "b" if not self.b else "a" if not self.a else None


def align(da: Dump, db: Dump, name_map: NameMap | None = None, select: Selection | None = None) -> list[Pair]:
    name_map, select = name_map or NameMap(), select or Selection()
    merge = da.world_size != db.world_size
    ga, gb = (_group(d, side, name_map, select, merge) for d, side in ((da, "a"), (db, "b")))
    pairs = [Pair(key[1], recs, gb.get(key, ()), merge) for key, recs in ga.items()]
    pairs += [Pair(key[1], (), recs, merge) for key, recs in gb.items() if key not in ga]
    return pairs


def _group(dump: Dump, side: str, name_map: NameMap, select: Selection, merge: bool) -> dict[tuple, tuple]:
    groups: dict[tuple, list[Record]] = {}
    origin: dict[str, str] = {}  # renamed name -> the dump's name it came from
    for r in sorted(dump.records, key=lambda r: (r.rank, r.seq)):
        name = name_map.rename(r.name, side)
        if name_map.ignored(name):
            continue
        first = origin.setdefault(name, r.name)
        if first != r.name:
            # two tensors under one name would be paired with the same counterpart: one of them unseen
            raise ParityError(
                f"{name_map.source}: side {side}: both {first!r} and {r.name!r} become {name!r}; "
                f"each name needs its own target"
            )
        if not select(r, name):
            continue
        key = (r.kind, name, r.phase, r.step, r.call_in_step, None if merge else r.rank)
        groups.setdefault(key, []).append(r)
    return {k: tuple(v) for k, v in groups.items()}


def missing_shards(records: tuple[Record, ...], merged: bool) -> list[str]:
    """When ranks are merged, every rank must hold the record: a missing rank is a failure, never a pass."""
    world = records[0].world_size
    if not merged or len(records) == world:
        return []
    missing = sorted(set(range(world)) - {r.rank for r in records})
    return [f"{len(records)} of {world} rank shards (rank(s) {missing} missing)"]


def fetch(
    dump: Dump, records: tuple[Record, ...], shard: Shard | None, merged: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """The tensor of one side of a pair, ranks merged by the shard rule: `(tensor, problems)`.

    Without a shard rule the ranks are replicas: rank 0 is used, and ranks that differ from it are a problem.
    """
    tensors = [dump.load(r) for r in records]
    if problems := missing_shards(records, merged):
        return tensors[0], problems
    if len(tensors) == 1:
        return tensors[0], []
    if shard is None:
        odd = [r.rank for r, t in zip(records, tensors) if not bitwise_equal(t, tensors[0])]
        return tensors[0], [f"replicas differ from rank 0 on rank(s) {odd}"] if odd else []
    if shard.reduce == "sum":
        return torch.stack([t.to(torch.float64) for t in tensors]).sum(0), []
    try:
        return torch.cat(tensors, dim=shard.dim), []
    except (RuntimeError, IndexError) as e:
        return tensors[0], [f"cannot concatenate rank shards along dim {shard.dim}: {str(e).splitlines()[0]}"]


def merged_shape(records: tuple[Record, ...], shard: Shard | None) -> tuple[int, ...]:
    """The shape `fetch` returns, from the manifest alone (for schema diffs)."""
    shape = records[0].shape
    if len(records) == 1 or shard is None or shard.reduce == "sum" or not shape:
        return shape
    dim = shard.dim % len(shape)
    return (*shape[:dim], sum(r.shape[dim] for r in records), *shape[dim + 1 :])

"""Rows of dump records addressed by (request, position): what lines up an engine step with the reference.

A record made under `dump.phase(..., cu_seqlens=..., requests=..., start_pos=...)` says which sequence each of its
leading rows belongs to and at which position; a site whose tap also passes `rows` (token-row indices) addresses
its rows through them. Rows listed in the record's `extra["skip_rows"]` (tokens an engine computed speculatively
and then rejected) have no key: nothing compares or forces them.

`RowStore` keeps one run's rows by (site path, field, key); `gather` rebuilds, for any other run's record, the
tensor the stored run had at the same rows: the reference laid out in the engine's step layout.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from parity.compare import sites
from parity.compare.loader import Dump
from parity.dump.format import Record
from parity.dump.tags import Tags
from parity.errors import ParityError

Key = tuple[str, int]  # (request id, position)


def token_keys(layout: Record | Tags) -> list[Key | None]:
    """The key of every token row of a forward, from its tags (`cu_seqlens`, `requests`, `start_pos`)."""
    cu, requests, starts = layout.cu_seqlens, layout.requests, layout.start_pos
    if cu is None or requests is None or starts is None:
        raise ParityError("rows: a record needs cu_seqlens, requests and start_pos tags to address its rows")
    skip = set(layout.extra.get("skip_rows", ()))
    keys: list[Key | None] = []
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        keys += [None if r in skip else (requests[i], starts[i] + r - a) for r in range(a, b)]
    return keys


def keys_of(layout: Record | Tags, n_rows: int, rows: torch.Tensor | None = None) -> list[Key | None]:
    """Keys of a tensor's `n_rows` leading rows: token rows, or the token rows named by `rows`."""
    tokens = token_keys(layout)
    if rows is None:
        if n_rows != len(tokens):
            raise ParityError(f"rows: {n_rows} rows but the tags describe {len(tokens)} tokens")
        return tokens
    return [tokens[int(r)] for r in rows.tolist()]


@dataclass
class Call:
    """The records of one tap call: its site, its fields' records and tensors, and the key of each row."""

    path: str
    site: sites.SitePath
    records: dict[str, Record]  # field -> record
    keys: list[Key | None]
    step: int | None
    phase: str | None

    def tensor(self, dump: Dump, field: str) -> torch.Tensor:
        return dump.load(self.records[field])

    @property
    def value_fields(self) -> list[str]:
        return [f for f in self.records if f != self.site.site.rows_field]


def calls(dump: Dump, n_layers: int) -> Iterator[Call]:
    """Every tap call of a dump, in execution order, with its rows keyed."""
    groups: dict[tuple, list[Record]] = {}
    for r in dump.records:
        if r.kind == "activation" and r.io == "output":
            groups.setdefault((r.run, r.seq), []).append(r)
    for records in groups.values():
        head = records[0]
        sp = sites.parse(head.module, n_layers)
        if sp is None or head.extra.get("speculative"):
            continue
        by_field = {r.field: r for r in records}
        rows = None
        if sp.site.rows_field is not None:
            rows = dump.load(by_field[sp.site.rows_field])
        n = head.shape[0] if head.shape else 0
        try:
            keys = keys_of(head, n, rows)
        except (ParityError, IndexError) as e:  # IndexError: a rows field naming a token the tags do not have
            raise ParityError(f"{dump.where(head)}: {head.name}: {str(e).removeprefix('rows: ')}") from None
        yield Call(head.module, sp, by_field, keys, head.step, head.phase)


class RowStore:
    """One run's rows: (site path, field) -> key -> row tensor."""

    def __init__(self):
        self.rows: dict[tuple[str, str], dict[Key, torch.Tensor]] = {}

    @classmethod
    def from_dump(cls, dump: Dump, n_layers: int, only: tuple[str, str] | None = None) -> "RowStore":
        """Every row of `dump`, or only those of one (site path, field)."""
        store = cls()
        for call in calls(dump, n_layers):
            if only is not None and call.path != only[0]:
                continue
            for field in call.value_fields:
                if only is not None and field != only[1]:
                    continue
                t = call.tensor(dump, field)
                table = store.rows.setdefault((call.path, field), {})
                for i, key in enumerate(call.keys):
                    if key is not None:
                        table[key] = t[i]  # a later computation of the same row (a replay) replaces the earlier one
        return store

    def gather(self, path: str, field: str, keys: list[Key | None], like: torch.Tensor):
        """The stored rows at `keys` as a tensor like `like` and a bool mask of the rows found."""
        table = self.rows.get((path, field), {})
        found = torch.tensor([k is not None and k in table for k in keys], dtype=torch.bool)
        out = like.clone()
        idx = found.nonzero().flatten().tolist()
        if idx:
            rows = [table[keys[i]] for i in idx]
            if any(r.shape != like.shape[1:] for r in rows):
                # ragged widths (id lists of another top-k width): the narrower side is padded with -1 by its tap
                rows = [_fit(r, like.shape[1:]) for r in rows]
            out[idx] = torch.stack(rows).to(device=like.device, dtype=like.dtype)
        return out, found


def _fit(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Pad or cut the last dim of `t` to `shape` (-1 padding: the id lists' 'none')."""
    width = shape[-1]
    if t.shape[-1] >= width:
        return t[..., :width]
    pad = t.new_full((*t.shape[:-1], width - t.shape[-1]), -1)
    return torch.cat([t, pad], dim=-1)

"""How the ranks' records of one tensor become one logical tensor when two dumps ran with different world sizes
(a tensor-parallel run against a one-rank run).

The rule comes from the name map's `[[shard]]` table when one matches (the user's word wins: external engines
declare nothing), else from what the records declare themselves (the `merge` field, `parity.dump.format`):
`cat:<dim>` concatenates the slices in rank order, `sum` adds partial sums (in float64), `replicated` (or no
declaration) takes rank 0 and fails the pair if another rank holds other bits (`align.fetch`).
"""

from parity.compare.align import Pair
from parity.compare.namemap import NameMap, Shard
from parity.dump.format import Record, parse_merge
from parity.errors import ParityError


def declared(records: tuple[Record, ...]) -> Shard | None:
    """The shard rule the records declare (None: replicated or undeclared). Every rank must declare the same."""
    rules = {r.merge for r in records}
    if len(rules) > 1:
        by_rank = ", ".join(f"rank {r.rank}: {r.merge}" for r in records)
        raise ParityError(f"{records[0].name}: the ranks declare different merge rules ({by_rank})")
    rule = rules.pop() if rules else None
    if rule is None:
        return None
    kind, dim = parse_merge(rule)
    if kind == "replicated":
        return None
    return Shard(None, dim, "cat" if kind == "cat" else "sum")


def shard_for(pair: Pair, name_map: NameMap) -> Shard | None:
    """The rule that merges `pair`'s rank records: the name map's, else the one declared on each side. A side with
    one rank needs none; two multi-rank sides must declare the same."""
    rule = name_map.shard(pair.name)
    if rule is not None or not pair.merged:
        return rule
    sides = [declared(recs) for recs in (pair.a, pair.b) if len(recs) > 1 or (recs and recs[0].world_size > 1)]
    if len(sides) == 2 and sides[0] != sides[1]:
        raise ParityError(f"{pair.name}: side a declares {sides[0]} but side b {sides[1]}")
    return sides[0] if sides else None

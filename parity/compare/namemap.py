"""A declarative map between the tensor names of two dumps, read from TOML.

# names on side b are rewritten into side a's names; the first rule whose regex matches wins
[[rename]]
side = "b"                                   # "a" or "b" (default "b")
match = '^model\\.layers\\.(\\d+)\\.mlp:'     # re.search; the matched part is replaced
to = 'layers.\\1.ffn:'                        # re.sub template: \\1 is the first group

ignore = ['rotary_emb', ':in\\.']            # records whose name matches are left out on both sides

# how to put tensor-parallel shards back together when the two dumps ran with different world sizes
[[shard]]
match = '\\.wo:out$'
dim = -1                                     # concatenate the ranks' tensors along this dim
[[shard]]
match = '\\.ffn:out$'
reduce = "sum"                               # partial sums (before the all-reduce): add them up

# `parity schema`: a dtype that differs only in width within its family (fp32 / bf16 / fp16; int32 / int64) is a
# note, not a failure: another engine may keep a tensor wider or narrower (HF's port: bf16 router weights and
# int64 ids where the official model has fp32 and int32); the values are still compared by `parity compare`
dtype_width = true
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from parity.errors import ParityError


@dataclass(frozen=True, slots=True)
class Rename:
    pattern: re.Pattern
    to: str
    side: str


@dataclass(frozen=True, slots=True)
class Shard:
    """Ranks hold slices (`dim`) or partial sums (`reduce == "sum"`) of the tensors whose name matches."""

    pattern: re.Pattern
    dim: int | None
    reduce: str


@dataclass(frozen=True, slots=True)
class NameMap:
    renames: tuple[Rename, ...] = ()
    ignore: tuple[re.Pattern, ...] = ()
    shards: tuple[Shard, ...] = ()
    source: str = "name map"  # the file it was read from, for messages
    dtype_width: bool = False  # schema: fp32 vs bf16, int32 vs int64 are notes (module docstring)

    def rename(self, name: str, side: str) -> str:
        for rule in self.renames:
            if rule.side == side and rule.pattern.search(name):
                try:
                    return rule.pattern.sub(rule.to, name, count=1)
                except (re.error, IndexError) as e:
                    raise ParityError(f"name map: rename {rule.pattern.pattern!r} -> {rule.to!r}: {e}") from None
        return name

    def ignored(self, name: str) -> bool:
        return any(p.search(name) for p in self.ignore)

    def shard(self, name: str) -> Shard | None:
        return next((s for s in self.shards if s.pattern.search(name)), None)

    @classmethod
    def load(cls, path: str | Path) -> "NameMap":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise ParityError(f"{path}: cannot read name map ({e.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ParityError(f"{path}: not valid TOML ({e})") from None
        _only(data, {"rename", "ignore", "shard", "dtype_width"}, f"{path}")
        dtype_width = data.get("dtype_width", False)
        if not isinstance(dtype_width, bool):
            raise ParityError(f"{path}: dtype_width must be true or false, got {dtype_width!r}")
        renames, shards = [], []
        for i, rule in enumerate(_tables(data, "rename", path)):
            where = f"{path}: rename[{i}]"
            _only(rule, {"match", "to", "side"}, where)
            side = rule.get("side", "b")
            if side not in ("a", "b"):
                raise ParityError(f"{where}: side must be 'a' or 'b', got {side!r}")
            pattern, to = _regex(rule, "match", where), _str(rule, "to", where)
            try:
                pattern.sub(to, "", count=1)  # the template is parsed even without a match
            except (re.error, IndexError) as e:
                raise ParityError(
                    f"{where}: to {to!r} is not a valid replacement for match {pattern.pattern!r} ({e})"
                ) from None
            renames.append(Rename(pattern, to, side))
        for i, rule in enumerate(_tables(data, "shard", path)):
            where = f"{path}: shard[{i}]"
            _only(rule, {"match", "dim", "reduce"}, where)
            reduce = rule.get("reduce", "cat")
            dim = rule.get("dim")
            is_dim = isinstance(dim, int) and not isinstance(dim, bool)  # TOML `true` is not a dim
            if reduce not in ("cat", "sum") or (reduce == "cat") != is_dim:
                found = ", ".join(f"{k} = {rule[k]!r}" for k in ("dim", "reduce") if k in rule) or "neither"
                raise ParityError(
                    f"{where}: give dim = <int> (concatenate shards) or reduce = 'sum' (partial sums), got {found}"
                )
            shards.append(Shard(_regex(rule, "match", where), dim, reduce))
        ignore = data.get("ignore", [])
        if not isinstance(ignore, list):
            raise ParityError(f"{path}: ignore must be a list of regexes")
        patterns = tuple(_regex({"ignore": p}, "ignore", f"{path}: ignore[{i}]") for i, p in enumerate(ignore))
        return cls(tuple(renames), patterns, tuple(shards), str(path), dtype_width)


def _tables(data: dict, key: str, path: Path) -> list[dict]:
    tables = data.get(key, [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ParityError(f"{path}: {key} must be an array of tables (one `[[...]]` header per rule)")
    return tables


def _only(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ParityError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _str(table: dict, key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str):
        raise ParityError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _regex(table: dict, key: str, where: str) -> re.Pattern:
    text = _str(table, key, where)
    try:
        return re.compile(text)
    except re.error as e:
        raise ParityError(f"{where}: {key} {text!r} is not a valid regex ({e})") from None

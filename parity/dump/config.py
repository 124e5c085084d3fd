"""`DumpConfig`: what to dump, read once from `PARITY_DUMP_*` env vars or built explicitly.

Every variable is listed in `docs/ENVS.md`. A bad value raises `ParityError` naming the variable, so a typo in a
launch script stops the run at start-up instead of silently dumping nothing.
"""

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from parity.dump.format import PHASES
from parity.errors import ParityError

# `layers.3`, `model.layers.3.attn`, `transformer.h.3`, `blocks.3`, `mtp.0`: the group is the layer id
DEFAULT_LAYER_REGEX = r"(?:^|\.)(?:layers|blocks|h|mtp)\.(\d+)(?=\.|$)"
WHAT = ("outputs", "inputs", "both")
MODES = ("full", "stats")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class Ranges:
    """A set of non-negative ints written as `0-3,7,10-` (inclusive spans; `10-` is open-ended)."""

    spans: tuple[tuple[int, int | None], ...]

    @classmethod
    def parse(cls, text: str, what: str) -> "Ranges":
        spans = []
        for part in text.replace(" ", "").split(","):
            m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", part)
            if m is None:
                raise ParityError(f"{what}={text!r}: expected comma-separated ints or ranges such as 0-3,7,10-")
            lo = int(m[1])
            hi = lo if m[2] is None else (int(m[3]) if m[3] else None)
            if hi is not None and hi < lo:
                raise ParityError(f"{what}={text!r}: range {part} is empty")
            spans.append((lo, hi))
        return cls(tuple(spans))

    @classmethod
    def of(cls, ints: Iterable[int]) -> "Ranges":
        return cls(tuple((int(i), int(i)) for i in sorted(set(ints))))

    def __contains__(self, i: object) -> bool:
        return isinstance(i, int) and any(lo <= i and (hi is None or i <= hi) for lo, hi in self.spans)

    def __str__(self) -> str:
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{'' if hi is None else hi}" for lo, hi in self.spans)


def _env(var: str):
    return field(default=None, metadata={"env": var})


@dataclass(frozen=True)
class DumpConfig:
    """What `parity.dump.install` hooks and writes. `DumpConfig()` (no dir) is off: no hook is registered.

    Module selection is an AND of `modules` (regex searched in the module path), `classes` (exact class names) and
    `layers` (layer ids derived from the path with `layer_regex`). With neither `modules` nor `classes` set, the
    layer blocks themselves are selected (the modules whose path ends at a layer index, e.g. `layers.3`).
    """

    dir: str | os.PathLike | None = _env("PARITY_DUMP_DIR")
    layers: Ranges | str | Iterable[int] | None = _env("PARITY_DUMP_LAYERS")
    modules: str | None = _env("PARITY_DUMP_MODULES")
    classes: frozenset[str] | str | Iterable[str] | None = _env("PARITY_DUMP_CLASSES")
    calls: Ranges | str | Iterable[int] | None = _env("PARITY_DUMP_CALLS")
    phases: frozenset[str] | str | Iterable[str] | None = _env("PARITY_DUMP_PHASES")
    steps: Ranges | str | Iterable[int] | None = _env("PARITY_DUMP_STEPS")
    what: str = field(default="outputs", metadata={"env": "PARITY_DUMP_WHAT"})
    mode: str = field(default="full", metadata={"env": "PARITY_DUMP_MODE"})
    weights: bool | str = field(default=False, metadata={"env": "PARITY_DUMP_WEIGHTS"})
    require_phase: bool | str = field(default=False, metadata={"env": "PARITY_DUMP_REQUIRE_PHASE"})
    layer_regex: str = field(default=DEFAULT_LAYER_REGEX, metadata={"env": "PARITY_DUMP_LAYER_REGEX"})

    def __post_init__(self):
        # normalise the convenient spellings (str, list, range) into one canonical form per field; frozen
        # dataclasses can only do that through object.__setattr__
        def put(name, value):
            object.__setattr__(self, name, value)

        env = {f.name: f.metadata["env"] for f in fields(self)}
        put("dir", None if self.dir in (None, "") else Path(self.dir))
        for name in ("layers", "calls", "steps"):
            put(name, _ranges(getattr(self, name), env[name]))
        put("classes", _names(self.classes, env["classes"]))
        phases = _names(self.phases, env["phases"]) or None
        if phases is not None and not phases <= set(PHASES):
            unknown = ", ".join(sorted(phases - set(PHASES)))
            raise ParityError(f"{env['phases']}: unknown phase(s) {unknown}; use {', '.join(PHASES)}")
        put("phases", phases)
        for name, options in (("what", WHAT), ("mode", MODES)):
            if getattr(self, name) not in options:
                raise ParityError(f"{env[name]}={getattr(self, name)!r}: must be one of {', '.join(options)}")
        for name in ("weights", "require_phase"):
            put(name, _bool(getattr(self, name), env[name]))
        if self.modules is not None:
            _compile(self.modules, env["modules"])
        if _compile(self.layer_regex, env["layer_regex"]).groups != 1:
            raise ParityError(f"{env['layer_regex']}={self.layer_regex!r}: needs exactly one group (the layer id)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DumpConfig":
        """Read every `PARITY_DUMP_*` variable once; unset variables keep their defaults."""
        environ = os.environ if environ is None else environ
        kwargs = {f.name: environ[f.metadata["env"]] for f in fields(cls) if f.metadata["env"] in environ}
        return cls(**kwargs)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    @property
    def layer_pattern(self) -> re.Pattern:
        return re.compile(self.layer_regex)

    def selects(self, path: str, cls_name: str, layer: int | None, block: str | None) -> bool:
        """Whether the module at `path` gets a hook."""
        if self.layers is not None and layer not in self.layers:
            return False
        if self.classes and cls_name not in self.classes:
            return False
        if self.modules is not None:
            return re.search(self.modules, path) is not None
        return bool(self.classes) or (block is not None and path == block)

    def wants(self, call: int, phase: str | None, step: int | None) -> bool:
        """Whether one forward call (the module's `call`-th, under the given phase tag) is written."""
        if self.calls is not None and call not in self.calls:
            return False
        if phase is None and (self.require_phase or self.phases is not None):
            return False
        if self.phases is not None and phase not in self.phases:
            return False
        return self.steps is None or step in self.steps


def _ranges(value, var: str) -> Ranges | None:
    if value is None or isinstance(value, Ranges):
        return value
    if isinstance(value, str):
        return Ranges.parse(value, var) if value.strip() else None
    try:
        return Ranges.of(value)
    except (TypeError, ValueError):
        raise ParityError(f"{var}: expected ints or a range string such as 0-3,7, got {value!r}") from None


def _names(value, var: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    items = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(v, str) for v in items):
        raise ParityError(f"{var}: expected names, got {value!r}")
    return frozenset(v.strip() for v in items if v.strip())


def _bool(value, var: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise ParityError(f"{var}={value!r}: expected 1/0, true/false, yes/no or on/off")
    return text in _TRUE


def _compile(pattern: str, var: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ParityError(f"{var}={pattern!r}: not a valid regex ({e})") from None

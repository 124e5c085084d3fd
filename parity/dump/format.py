"""The dump file format: one `manifest.jsonl` line per tensor, tensors in safetensors files beside it.

This module is the contract between the writer (`parity.dump`) and every reader (`parity.compare`). It holds no
model code, so a dump from another machine or commit can always be read.

A dump dir looks like:

    manifest.jsonl                      # one JSON object per line, one line per tensor (schema below)
    tensors/<run>-<seq>.safetensors     # the tensors of one hook call, keyed by field name
    weights/<run>-<block>.safetensors   # PARITY_DUMP_WEIGHTS: parameters and buffers, keyed by their name
    rank<r>/...                         # the same layout per rank when torch.distributed has world size > 1

A record of a tensor-parallel run may say how the ranks' records make one logical tensor (`merge`, optional):
"replicated" (every rank holds the whole tensor), "sum" (partial sums, before an all-reduce) or "cat:<dim>" (each
rank holds a slice along dim, in rank order). A model declares it per module with the `parity_merge` attribute
(`MERGE_ATTR`): one rule for all its fields, or a dict field -> rule.

Every line carries `schema_version`, so lines appended by several installs (model, then MTP drafter) stay
self-describing.
"""

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from parity.errors import ParityError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added `start_pos`
MANIFEST = "manifest.jsonl"
TENSOR_DIR = "tensors"
WEIGHT_DIR = "weights"

PHASES = ("prefill", "decode", "mtp-draft", "mtp-verify")
# dtype strings of safetensors headers -> the manifest's spelling (`dtype_name`)
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "C64": "complex64",
}
# the stats-mode keys every reader uses (`parity.dump.stats` writes more): counts, and the norm over finite elements
STATS_COUNTS = ("numel", "nan", "inf")
KINDS = ("activation", "weight")
MERGE_ATTR = "parity_merge"
_MERGE = re.compile(r"replicated|sum|cat:-?\d+")
IOS = ("input", "output")


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"` (the spelling stored in the manifest)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ParityError(f"{where}: field 'dtype' is not a torch dtype: {name!r}")
    return dtype


def to_float64(t: torch.Tensor) -> torch.Tensor | None:
    """Any stored tensor as float64 numbers (bool -> 0/1, complex -> [..., 2]); None for packed dtypes such as
    `float4_e2m1fn_x2`, which torch cannot cast and which can only be compared bitwise."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    try:
        # fp8 / e8m0 have no direct cast to float64 on every backend; float32 holds them exactly
        return (t.float() if t.is_floating_point() and t.element_size() == 1 else t).to(torch.float64)
    except (NotImplementedError, RuntimeError):
        return None


def merge_rule(declared, field_name: str) -> str | None:
    """The merge rule a module declared (`MERGE_ATTR`) for one of its fields; None if it declared none."""
    rule = declared.get(field_name) if isinstance(declared, dict) else declared
    if rule is not None and (not isinstance(rule, str) or not _MERGE.fullmatch(rule)):
        raise ParityError(f"{MERGE_ATTR} of field {field_name!r}: {rule!r} is not replicated, sum or cat:<dim>")
    return rule


def parse_merge(rule: str) -> tuple[str, int | None]:
    """`"cat:1"` -> `("cat", 1)`; `"sum"` -> `("sum", None)`; `"replicated"` -> `("replicated", None)`."""
    kind, _, dim = rule.partition(":")
    return kind, int(dim) if dim else None


def record_name(module: str, field_name: str) -> str:
    """The tensor's name in a dump: `layers.3.attn:out.0` (a colon never occurs in a module path)."""
    return f"{module}:{field_name}"


@dataclass(frozen=True)
class Origin:
    """Which tensor a record holds: the writing process and its execution order, the module and field, its shape
    and dtype, and the hook call (none of it depends on what the runner tagged)."""

    seq: int
    run: str
    kind: str
    name: str
    module: str
    field: str
    shape: tuple[int, ...]
    dtype: str
    cls: str | None = None
    layer: int | None = None
    block: str | None = None
    io: str | None = None
    call: int | None = None
    call_in_step: int | None = None


@dataclass(frozen=True, slots=True)
class Tags:
    """The tags a runner puts around a forward (`parity.dump.phase`), stored on every record made inside it.

    `cu_seqlens` ([N+1], for flat ragged `[T, ...]` tensors) and `batch` (N, for `[b, s, ...]` tensors) are the two
    ways to say how the N sequences of the forward are laid out; `requests` names what each of the N slots holds
    (equal ids = the same sequence, which is what slot-invariance compares)."""

    phase: str | None = None
    step: int | None = None
    cu_seqlens: tuple[int, ...] | None = None
    batch: int | None = None
    requests: tuple[str, ...] | None = None
    start_pos: tuple[int, ...] | None = None  # [N] position of each sequence's first token in this forward
    extra: dict[str, Any] = field(default_factory=dict)

    def as_record_fields(self) -> dict[str, Any]:
        """The tags as keyword arguments of `Record` (`extra` is shared, not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(Tags)}


# dataclass fields come base by base (Origin's, then Tags'), then the class's own: the key order of a manifest line
@dataclass(frozen=True, slots=True)
class Record(Tags, Origin):
    """One tensor of a dump: which tensor (`Origin`), its tags (`Tags`), and where its data lives.

    Alignment between two dumps uses `ident` (kind, name, phase, step, call_in_step) plus the rank; `seq` is the
    execution order inside the writing process.
    """

    merge: str | None = None  # how the ranks' records merge (module docstring); None: not declared
    rank: int = 0
    world_size: int = 1
    file: str | None = None
    key: str | None = None
    stats: dict[str, Any] | None = None

    @property
    def ident(self) -> tuple:
        """The alignment key, without rank: two implementations produce the same ident for the same tensor."""
        return (self.kind, self.name, self.phase, self.step, self.call_in_step)

    @property
    def num_slots(self) -> int | None:
        """How many sequences the record's batch holds, from its seq layout; None if no layout was tagged."""
        if self.cu_seqlens is not None:
            return len(self.cu_seqlens) - 1
        return self.batch

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for k, v in asdict(self).items():
            out["class" if k == "cls" else k] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Record":
        """Validate one parsed manifest line. `where` names the file and line for the error message."""
        if not isinstance(obj, dict):
            raise ParityError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        version = obj.get("schema_version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(map(str, READABLE_VERSIONS))
            raise ParityError(f"{where}: schema_version {version!r} unsupported (this parity reads {readable})")
        get = _FieldReader(obj, where)
        kind = get.choice("kind", KINDS)
        phase = get.choice("phase", PHASES, optional=True)
        shape = get.int_list("shape")
        if shape is None or any(n < 0 for n in shape):
            raise ParityError(f"{where}: field 'shape' must be a list of non-negative ints, got {obj.get('shape')!r}")
        dtype = get.str("dtype")
        parse_dtype(dtype, where)
        file, stats = get.str("file", optional=True), get.dict("stats", optional=True)
        if (file is None) == (stats is None):
            raise ParityError(f"{where}: exactly one of 'file' (full mode) and 'stats' (stats mode) must be set")
        if stats is not None:
            _check_stats(stats, where)
        cu_seqlens = get.int_list("cu_seqlens", optional=True)
        if cu_seqlens is not None and not is_cu_seqlens(cu_seqlens):
            raise ParityError(f"{where}: field 'cu_seqlens' must start at 0 and never decrease, got {cu_seqlens}")
        requests = obj.get("requests")
        if requests is not None and not isinstance(requests, list):
            raise ParityError(f"{where}: field 'requests' must be a list, got {requests!r}")
        start_pos = get.int_list("start_pos", optional=True)
        merge = get.str("merge", optional=True)
        if merge is not None and not _MERGE.fullmatch(merge):
            raise ParityError(f"{where}: field 'merge' must be replicated, sum or cat:<dim>, got {merge!r}")
        return cls(
            seq=get.int("seq"),
            run=get.str("run"),
            kind=kind,
            name=get.str("name"),
            module=get.str("module"),
            field=get.str("field"),
            shape=tuple(shape),
            dtype=dtype,
            cls=get.str("class", optional=True),
            layer=get.int("layer", optional=True),
            block=get.str("block", optional=True),
            io=get.choice("io", IOS, optional=True),
            call=get.int("call", optional=True),
            call_in_step=get.int("call_in_step", optional=True),
            phase=phase,
            step=get.int("step", optional=True),
            cu_seqlens=None if cu_seqlens is None else tuple(cu_seqlens),
            batch=get.int("batch", optional=True),
            requests=None if requests is None else tuple(str(r) for r in requests),
            start_pos=None if start_pos is None else tuple(start_pos),
            extra=get.dict("extra", optional=True) or {},
            merge=merge,
            rank=get.int("rank"),
            world_size=get.int("world_size"),
            file=file,
            key=get.str("key") if file is not None else None,
            stats=stats,
        )


def _check_stats(stats: dict, where: str) -> None:
    for key in STATS_COUNTS:
        v = stats.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ParityError(f"{where}: field 'stats.{key}' must be a non-negative int, got {v!r}")
    l2 = stats.get("l2")
    if not isinstance(l2, (int, float)) or isinstance(l2, bool) or not 0 <= l2 < float("inf"):
        raise ParityError(f"{where}: field 'stats.l2' must be a finite number >= 0, got {l2!r}")


def is_cu_seqlens(cu) -> bool:
    """Cumulative sequence lengths: at least two entries, starting at 0, never decreasing."""
    return len(cu) >= 2 and cu[0] == 0 and all(a <= b for a, b in zip(cu, cu[1:]))


class _FieldReader:
    """Typed access to a manifest line; every error names the file, line and field."""

    def __init__(self, obj: dict, where: str):
        self.obj, self.where = obj, where

    def _get(self, name: str, types: tuple[type, ...], what: str, optional: bool):
        v = self.obj.get(name)
        if v is None:
            if optional:
                return None
            raise ParityError(f"{self.where}: missing field {name!r}")
        # bool is an int subclass: `"layer": true` is still a bad line
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise ParityError(f"{self.where}: field {name!r} must be {what}, got {v!r}")
        return v

    def int(self, name: str, optional: bool = False):
        return self._get(name, (int,), "an int", optional)

    def str(self, name: str, optional: bool = False):
        return self._get(name, (str,), "a string", optional)

    def dict(self, name: str, optional: bool = False):
        return self._get(name, (dict,), "an object", optional)

    def choice(self, name: str, options: tuple[str, ...], optional: bool = False):
        v = self.str(name, optional)
        if v is not None and v not in options:
            raise ParityError(f"{self.where}: field {name!r} must be one of {', '.join(options)}; got {v!r}")
        return v

    def int_list(self, name: str, optional: bool = False):
        v = self._get(name, (list,), "a list of ints", optional)
        if v is not None and not all(isinstance(n, int) and not isinstance(n, bool) for n in v):
            raise ParityError(f"{self.where}: field {name!r} must be a list of ints, got {v!r}")
        return v

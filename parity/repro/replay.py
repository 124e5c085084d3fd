"""Run one saved op call with a candidate implementation and with its reference twin, and judge the difference.

What a repro runs, and what `write_kernel_repros` runs in-process to pick the calls worth saving, is this module:
the standalone `repro_<op>.py` script imports it, so the numbers it prints are the ones the extraction measured.

The twin: RoPE runs the reference's own `apply_rotary_emb` (one position per token); every other op runs its
`torch` backend, which is the reference twin's math in the optimized layout and is asserted `torch.equal` to the
twin named in its op file by `tests/optimized/ops/test_<op>.py` (the reference computes most ops inline in its
model code, where no function can be called on an op's arguments).

The judge: float outputs by the verdict's row metric (relative L2 error of each leading row, float64) against the
threshold saved with the repro (0: the backend claims bitwise equality with its twin, so any difference fails);
integer outputs (expert ids, top-k entry ids) by the rows whose id sets differ, which must be none.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from parity.compare.metrics import compare_tensors
from parity.compare.verdict import _row_errors, _set_differences  # the verdict's own row metrics
from parity.errors import ParityError
from parity.io import read_json
from parity.optimized.ops import Impl, OpsConfig, registry, resolve_ops
from parity.repro import codec

METRIC = (
    "per-row relative L2 error |candidate - twin| / |twin| in float64 over the leading (token) dim for float "
    "outputs, the verdict's row metric; rows whose id sets differ for integer outputs"
)


@dataclass
class OutputCheck:
    name: str  # out / out.0 ...
    dtype: str
    shape: list[int]
    bitwise: bool
    max_row_err: float | None = None  # float outputs
    worst_row: int | None = None
    cos: float | None = None
    max_abs: float | None = None
    rows_differ: int = 0  # rows over the threshold (float) or with other id sets (integer)
    passed: bool = True


@dataclass
class ReproResult:
    op: str
    candidate: str
    twin: str
    threshold: float
    passed: bool
    outputs: list[OutputCheck] = field(default_factory=list)
    same_as_run: bool | None = None  # the candidate gave bitwise the output the op gave in the run

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_twin(x: torch.Tensor, freqs_cis: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    from parity.reference.model import apply_rotary_emb

    apply_rotary_emb(x.unsqueeze(0), freqs_cis, inverse)  # [1, T, (h,) r]: one position per token, in place on x
    return x


def twin(op: str) -> tuple[Callable, str]:
    """The reference twin of `op` and its description."""
    if op == "rope":
        return _rope_twin, "parity.reference.model.apply_rotary_emb (one position per token)"
    entry = registry()[op]["torch"]
    fn = entry.load()
    return fn, (
        f"the torch backend {fn.__module__}.{fn.__qualname__}, asserted bitwise equal to the twin named in "
        f"parity/optimized/ops/{op}.py by tests/optimized/ops/test_{op}.py"
    )


def importable(fn: Callable) -> str | None:
    """`module:qualname` when `fn` can be imported back by that name (a module-level function), else None."""
    import importlib

    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or "<" in qualname:
        return None
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return f"{module}:{qualname}" if obj is fn else None


def candidate(meta: dict, backend: str | None = None) -> tuple[Callable, str]:
    """The implementation a repro runs: `backend` from the registry if given; else what ran in the run (a planted
    selftest bug over its backend, an importable replacement, or the registry's backend)."""
    op, ran = meta["op"], meta["ran"]
    if backend is not None:
        return getattr(resolve_ops(OpsConfig(overrides=((op, backend),))), op), f"the {backend!r} backend"
    config = OpsConfig(overrides=((op, ran["backend"]),))
    if ran.get("plant"):
        from parity.selftest.bugs import library

        bug = next((b for b in library(meta["n_layers"]) if b.name == ran["plant"]), None)
        if bug is None or bug.ops is None:
            raise ParityError(f"{meta['op']} repro: planted bug {ran['plant']!r} is not an ops bug of the library")
        ops = bug.ops(resolve_ops(config))
        return getattr(ops, op), f"the {ran['backend']!r} backend with the planted bug {ran['plant']!r}"
    if ran.get("replaced"):
        if not ran.get("impl"):
            raise ParityError(
                f"{op} repro: the op that ran ({ran['replaced']}) cannot be imported again; pass --backend NAME"
            )
        try:
            return Impl(ran["impl"]).load(), ran["impl"]
        except (ImportError, AttributeError) as e:
            raise ParityError(
                f"{op} repro: cannot import {ran['impl']} ({e}); put its module on PYTHONPATH or pass --backend NAME"
            ) from None
    return getattr(resolve_ops(config), op), f"the {ran['backend']!r} backend"


def threshold_for(meta: dict, backend: str | None) -> float:
    """The threshold a repro judges by: the saved one for what ran; for another backend, 0 where it claims bitwise
    equality with the twin, else the verdict's threshold at the failing site."""
    if backend is None:
        return float(meta["threshold"])
    entry = registry()[meta["op"]].get(backend)
    return 0.0 if entry is not None and entry.bitwise else float(meta["verdict"].get("threshold") or 0.0)


def _outputs(value) -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [("out", value)]
    if isinstance(value, tuple | list):
        return [(f"out.{i}", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    raise ParityError(f"op output of type {type(value).__name__}: expected a tensor or a tuple of tensors")


def judge(got, want, threshold: float) -> list[OutputCheck]:
    """Each output of the candidate (`got`) against the twin's (`want`); see the module docstring."""
    checks = []
    for (name, c), (_, w) in zip(_outputs(got), _outputs(want), strict=True):
        chk = OutputCheck(name, str(w.dtype).removeprefix("torch."), list(w.shape), bitwise=False)
        if c.dtype != w.dtype or c.shape != w.shape:
            chk.passed, chk.rows_differ = False, -1
            chk.dtype = f"{chk.dtype} (candidate {str(c.dtype).removeprefix('torch.')} {list(c.shape)})"
            checks.append(chk)
            continue
        c, w = c.cpu(), w.cpu()
        rows_c, rows_w = (c.reshape(1, -1), w.reshape(1, -1)) if c.ndim < 2 else (c, w)
        if not c.is_floating_point():
            chk.bitwise = torch.equal(c, w)
            chk.rows_differ = int((_set_differences(rows_c, rows_w) > 0).sum()) if rows_c.numel() else 0
            chk.passed = chk.rows_differ == 0
        else:
            err = _row_errors(rows_c, rows_w) if rows_c.numel() else torch.zeros(0, dtype=torch.float64)
            chk.bitwise = bool((err == 0).all())  # NaN facing NaN counts as equal, as in the verdict
            if err.numel():
                chk.worst_row = int(err.argmax())
                chk.max_row_err = float(err[chk.worst_row])
            m = compare_tensors(w, c)
            chk.cos, chk.max_abs = m.cos, m.max_abs
            if threshold == 0.0:
                chk.rows_differ = int((err > 0).sum())
                chk.passed = chk.bitwise
            else:
                chk.rows_differ = int((err > threshold).sum())
                chk.passed = chk.rows_differ == 0
        checks.append(chk)
    return checks


def run_call(op: str, fn: Callable, args: tuple, kwargs: dict, threshold: float, cand: str, run_output=None):
    """`fn` and the twin on fresh copies of the same arguments, judged."""
    twin_fn, twin_name = twin(op)
    got = fn(*codec.clone(args), **codec.clone(kwargs))
    want = twin_fn(*codec.clone(args), **codec.clone(kwargs))
    checks = judge(got, want, threshold)
    same = None
    if run_output is not None:
        same = all(torch.equal(a.cpu(), b.cpu()) for (_, a), (_, b) in zip(_outputs(got), _outputs(run_output)))
    return ReproResult(op, cand, twin_name, threshold, all(c.passed for c in checks), checks, same)


def _is(kind, optional: bool = False):
    def ok(v) -> bool:
        return (optional and v is None) or (isinstance(v, kind) and not (kind is not bool and isinstance(v, bool)))

    return ok


def _device(v) -> bool:
    try:
        return isinstance(v, str) and torch.device(v).type in ("cpu", "cuda")
    except (RuntimeError, ValueError):
        return False


_COUNT = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
_FIELDS = {  # key: (check, what it must be); every key a repro's listing, script and replay read
    "op": (_is(str), "an op name"),
    "ran": (_is(dict), "an object (backend, plant, impl, replaced)"),
    "n_layers": (lambda v: _COUNT(v) and v >= 1, "an integer >= 1"),
    "call_site": (_is(dict), "an object (site, step, request, position)"),
    "result": (_is(dict), "an object with the 'candidate' that ran"),
    "threshold": (lambda v: _is(int | float)(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "tensors": (
        lambda v: isinstance(v, str) and v == Path(v).name and v not in ("", ".", ".."),
        "the file name of the safetensors next to it",
    ),  # fmt: skip
    "args": (_is(dict), "an argument spec"),
    "kwargs": (_is(dict), "an object of argument specs"),
}
_OPTIONAL = {
    "device": (lambda v: _device(v), "cpu or cuda[:N]"),
    "verdict": (_is(dict), "an object"),
    "output": (_is(dict, optional=True), "an argument spec or null"),
}
_PARTS = {  # nested objects: key -> {field: (check, what)}
    "ran": {"backend": (_is(str), "a backend name"), "plant": (_is(str, True), "a bug name or null"),
            "impl": (_is(str, True), "'module:function' or null"), "replaced": (_is(str, True), "a name or null")},
    "call_site": {"site": (_is(str), "a site name"), "step": (_COUNT, "an integer >= 0"),
                  "request": (_is(str | int), "a request id"), "position": (_COUNT, "an integer >= 0")},
    "result": {"candidate": (_is(str), "a description")},
}  # fmt: skip


def check_meta(meta, path: Path) -> dict:
    """A repro JSON checked key by key against what is read from it (one line naming the file and the key); the
    op and the backend that ran must be in the registry and every argument spec rebuildable."""
    if not isinstance(meta, dict):
        raise ParityError(f"{path}: expected a repro JSON object, found {type(meta).__name__}")
    for table, required in ((_FIELDS, True), (_OPTIONAL, False)):
        for key, (ok, what) in table.items():
            if key not in meta:
                if required:
                    raise ParityError(f"{path}: missing key {key!r} ({what})")
            elif not ok(meta[key]):
                raise ParityError(f"{path}: key {key!r}: expected {what}, found {meta[key]!r}"[:300])
    for key, parts in _PARTS.items():
        for sub, (ok, what) in parts.items():
            if not ok(meta[key].get(sub)):  # a missing optional part reads as null
                found = repr(meta[key][sub]) if sub in meta[key] else "nothing"
                raise ParityError(f"{path}: key '{key}.{sub}': expected {what}, found {found}"[:300])
    impls = registry().get(meta["op"])
    if impls is None:
        raise ParityError(f"{path}: key 'op': {meta['op']!r} is not an op of the registry ({', '.join(registry())})")
    if meta["ran"]["backend"] not in impls:
        raise ParityError(
            f"{path}: key 'ran.backend': {meta['ran']['backend']!r} is not a backend of op {meta['op']!r} "
            f"({', '.join(sorted(impls))})"
        )
    verdict = meta.get("verdict", {})
    if verdict.get("threshold") is not None and not _is(int | float)(verdict["threshold"]):
        raise ParityError(f"{path}: key 'verdict.threshold': expected a number or null, found {verdict['threshold']!r}")
    codec.check_spec(meta["args"], f"{path}: args")
    for k, spec in meta["kwargs"].items():
        codec.check_spec(spec, f"{path}: kwargs.{k}")
    if meta.get("output") is not None:
        codec.check_spec(meta["output"], f"{path}: output")
    return meta


def load(json_path: Path, device: str | None = None) -> tuple[dict, tuple, dict, object]:
    """A saved repro: its JSON, the call's args and kwargs, and the op's output in the run."""
    json_path = Path(json_path)
    meta = check_meta(read_json(json_path, f"{json_path}: no such repro JSON", f"{json_path}: not a readable repro "
                                "JSON"), json_path)  # fmt: skip
    if device is not None and not _device(device):
        raise ParityError(f"--device {device!r}: expected cpu or cuda[:N]")
    st = json_path.parent / meta["tensors"]
    try:
        tensors = load_file(st)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ParityError(f"{st}: not a readable safetensors file ({e})") from None
    dev = device or meta.get("device", "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        dev = "cpu"
    args = codec.decode(meta["args"], tensors, dev)
    kwargs = {k: codec.decode(s, tensors, dev) for k, s in meta["kwargs"].items()}
    output = codec.decode(meta["output"], tensors, dev) if meta.get("output") else None
    return meta, args, kwargs, output


def render(result: ReproResult) -> str:
    """The lines a repro prints: what ran, each output's metrics, and PASS / FAIL."""

    def num(x):
        return "-" if x is None else (f"{x:.3g}" if math.isfinite(x) else str(x))

    lines = [
        f"op        {result.op}",
        f"candidate {result.candidate}",
        f"twin      {result.twin}",
        f"threshold {'bitwise (0)' if result.threshold == 0 else num(result.threshold)} ({METRIC})",
    ]
    for c in result.outputs:
        lines.append(
            f"  {c.name:6} {c.dtype} {c.shape}: bitwise {c.bitwise}, max row err {num(c.max_row_err)} (row "
            f"{c.worst_row if c.worst_row is not None else '-'}), cos {'-' if c.cos is None else f'{c.cos:.8f}'}, "
            f"max|diff| {num(c.max_abs)}, "
            f"rows failing {c.rows_differ} -> {'ok' if c.passed else 'FAIL'}"
        )
    if result.same_as_run is not None:
        lines.append(f"candidate output identical to the run's: {result.same_as_run}")
    lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)

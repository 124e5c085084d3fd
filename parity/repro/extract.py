"""Kernel repros of a failed run: the op calls that compute its first failing site, saved with a script each.

`write_kernel_repros(report, folder, case=..., captures=...)`:

1. the first failing row of the report's verdict (execution order, as the verdict names it): site, layer, step,
   request, position, and the threshold it was judged by;
2. the engine again, teacher-forced from the reference's records, with every op wrapped by an `OpRecorder`: the op
   calls of the failing block's forward at that step, up to the failing tap, inputs and outputs copied;
3. each recorded call rerun in-process with the op that ran and with its twin (`replay`): the calls that
   reproduce the failure are kept, those of the failing site's own segment first (at most one per op, `limit` in
   all); when none does (a bug outside the ops: model code, cache addressing), the op that computes the site is
   saved anyway, passing, so the reader can see the kernels are not at fault;
4. per kept call, in `folder/repro/`: `repro_<op>.safetensors` (the inputs and the run's output),
   `repro_<op>.json` (op, backend, what ran, shapes, dtypes, call site, metric, threshold, the in-process result)
   and `repro_<op>.py`, which reloads them and prints the same metrics and PASS / FAIL (exit 1 on FAIL).

With `captures` (the `Captures` of the run) only the recording run is added; without them the case's runs are
captured again from the report's checkpoint, backends and planted bug (the targets, the chained engine and the
reference: what the forced run is forced from).
"""

import dataclasses
import os
from contextlib import nullcontext
from pathlib import Path

from safetensors.torch import save_file

from parity.capture import runs
from parity.capture.session import Captures, capture
from parity.cases import Case, load_case
from parity.checkpoint import Checkpoint
from parity.compare import sites
from parity.compare.rows import RowStore
from parity.errors import ParityError
from parity.io import atomic_write, atomic_write_json, atomic_write_text, check_output_dir
from parity.optimized.ops import OpsConfig, registry, resolve_ops
from parity.repro import codec, replay
from parity.repro.record import OpCall, OpRecorder, Target
from parity.repro.script import script_text
from parity.run import RunReport, planted_bug, prepare_checkpoint, run_case, run_inputs

SCHEMA = 1


def first_failure(report: RunReport, n_layers: int) -> tuple[Target, dict] | None:
    """The verdict's first failing row (site, layer, step, row) and its report row; None if the run passed or its
    failure has no row (rows without a reference value, NaN in the reference)."""
    failing = []
    for row in report.sites:
        if row["passed"] or row.get("first_failure") is None:
            continue
        sp = sites.parse(row["site"], n_layers)
        if sp is None or sp.block is None:
            continue  # the model's logits: computed by the head, outside every block
        failing.append((sites.order_key(sp, n_layers), tuple(row["first_failure"]), row["field"], sp, row))
    if not failing:
        return None
    _, (step, request, position), _, sp, row = min(failing, key=lambda f: f[:3])
    return Target(sp.path, sp.layer, sp.block, int(step), str(request), int(position)), row


def _ops_config(report: RunReport) -> OpsConfig:
    table = registry()
    overrides = tuple((op, b) for op, b in report.backends.items() if op in table and b != "torch")
    return OpsConfig(overrides=overrides)


def _recaptured(report: RunReport, case: Case | None, transform_ops) -> Captures:
    if case is None:
        raise ParityError("write_kernel_repros: pass the run's case (or its captures) to capture the runs again")
    inp = run_inputs(case, Path(report.checkpoint), report.device, ops=_ops_config(report))
    return capture(inp, transform_ops, forced=False)


def _what_ran(op: str, fn, plain, transformed, report: RunReport) -> dict:
    """The backend the report names for `op` and, where the op was replaced (a planted bug, a caller's transform),
    what replaced it: the script reloads it by that name."""
    backend = report.backends.get(op, "torch")
    ran = {"backend": backend, "plant": None, "impl": replay.importable(fn), "replaced": None}
    if fn is getattr(plain, op):
        return ran
    if getattr(transformed, op) is getattr(plain, op) and report.planted:
        ran["plant"] = report.planted  # the planted bug replaced this op (the script plants it again)
    else:
        ran["replaced"] = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return ran


def write_kernel_repros(
    report: RunReport,
    folder: Path,
    *,
    case: Case | None = None,
    captures: Captures | None = None,
    transform_ops=None,
    limit: int = 4,
    max_bytes: int = 1 << 30,
) -> list[Path]:
    """The repro scripts written for `report`'s first failure into `folder/repro/` (module docstring); [] when
    the run passed or its failure is not inside a block. Repros an earlier run left there are removed first.
    `transform_ops` is the one the run was given (the planted bug `report.planted` is added as `run_case` adds
    it)."""
    out = Path(folder) / "repro"
    check_output_dir(out, "repro folder")
    _clear(out)
    if case is not None and case.candidate != "optimized":
        return []  # another engine (HF transformers) has no op registry to record or replay
    ckpt = captures.inputs.ckpt if captures is not None else Path(report.checkpoint)
    n_layers = Checkpoint(ckpt).args.n_layers
    found = None if report.passed else first_failure(report, n_layers)
    if found is None:
        return []
    target, row = found
    bug = planted_bug(case, report.planted) if report.planted else None
    if bug is not None and case is None:
        raise ParityError("write_kernel_repros: a run with a planted bug needs its case")
    with bug.patch() if bug is not None else nullcontext():
        c = captures if captures is not None else _recaptured(report, case, _chain(transform_ops, bug))
        recorder = OpRecorder(target, max_bytes=max_bytes)
        plain = resolve_ops(c.inputs.ops)
        transformed = transform_ops(plain) if transform_ops is not None else plain
        ran_ops = bug.ops(transformed) if bug is not None and bug.ops is not None else transformed
        store = RowStore.from_dump(c.reference.dump, c.n_layers)
        with recorder:
            runs.engine_capture(c.inputs, c.targets, force=store, transform_ops=lambda _: recorder.wrap(ran_ops))
    if not recorder.site_fired:
        raise ParityError(
            f"repro: the forced run never reached {target.site} at step {target.step} for request {target.request} "
            f"position {target.position}: the report does not belong to these runs"
        )
    replaced = _replaced_by_transform(plain, transformed)
    threshold_of = {}
    for op, backend in c.inputs.ops.backends().items():
        entry = registry()[op].get(backend)
        # a backend that claims bitwise equality with its twin is held to it, planted bug or not; a caller's own
        # replacement claims nothing and is judged by the verdict's threshold at the failing site
        claims = entry is not None and entry.bitwise and op not in replaced
        threshold_of[op] = 0.0 if claims else float(row["threshold"] or 0.0)
    results = []
    for call in recorder.calls:
        ran = _what_ran(call.op, call.fn, plain, transformed, report)
        result = replay.run_call(call.op, call.fn, call.args, call.kwargs, threshold_of[call.op], _describe(ran),
                                 call.output)  # fmt: skip
        results.append((call, result, ran))
    written = []
    for call, result, ran in _choose(results, recorder, limit):
        written.append(_write(out, call, result, ran, target, row, recorder, report, n_layers, c.inputs.device))
    return written


def _clear(out: Path) -> None:
    """Remove the repros an earlier run wrote into the same folder (a rerun with the same --out): `parity repro`
    would run them as this run's."""
    if out.is_dir():
        for path in out.glob("repro_*"):
            if path.suffix in (".py", ".json", ".safetensors") and path.is_file():
                path.unlink()


def _chain(transform_ops, bug):
    if bug is None or bug.ops is None:
        return transform_ops
    return bug.ops if transform_ops is None else (lambda ops: bug.ops(transform_ops(ops)))


def _replaced_by_transform(plain, transformed) -> set[str]:
    return {f.name for f in dataclasses.fields(plain) if getattr(plain, f.name) is not getattr(transformed, f.name)}


def _choose(results: list, recorder: OpRecorder, limit: int) -> list:
    """Failing calls, the failing site's own segment first and the latest call first within it (the op closest
    to the tap computes the site), one per op; else the call that computes the site."""
    segment = {id(c) for c in recorder.segment()}
    failing = [r for r in results if not r[1].passed]
    failing.sort(key=lambda r: (id(r[0]) not in segment, -r[0].index))
    chosen, ops = [], set()
    for r in failing:
        if r[0].op not in ops and len(chosen) < limit:
            chosen.append(r)
            ops.add(r[0].op)
    if not chosen:
        own = [r for r in results if id(r[0]) in segment] or results
        chosen = own[-1:]
    return chosen


def _write(out: Path, call: OpCall, result, ran, target: Target, row, recorder, report, n_layers, device) -> Path:
    stem = f"repro_{call.op}"
    tensors: dict = {}
    args = codec.encode(call.args, tensors, "args")
    kwargs = {k: codec.encode(v, tensors, f"kwargs.{k}") for k, v in call.kwargs.items()}
    output = codec.encode(call.output, tensors, "output")
    meta = {
        "schema": SCHEMA,
        "op": call.op,
        "ran": ran,
        "n_layers": n_layers,
        "device": device,
        "call_site": {
            "site": target.site,
            "block": target.block,
            "layer": target.layer,
            "step": target.step,
            "request": target.request,
            "position": target.position,
            "call_index": call.index,
            "after_tap": call.after_tap or f"{target.block} (start)",
            "in_site_segment": call.after_tap == recorder.segment_start,
        },
        "verdict": {k: row.get(k) for k in ("site", "field", "phase", "max_err", "threshold", "threshold_source")},
        "location": report.location,
        "metric": replay.METRIC,
        "threshold": result.threshold,
        "threshold_source": (
            "the backend claims bitwise equality with its twin (registry)"
            if result.threshold == 0
            else f"the verdict's threshold at {row['site']}:{row['field']} {row['phase']} ({row['threshold_source']})"
        ),
        "twin": result.twin,
        "tensors": f"{stem}.safetensors",
        "shapes": {k: list(t.shape) for k, t in tensors.items()},
        "dtypes": {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()},
        "args": args,
        "kwargs": kwargs,
        "output": output,
        "result": result.to_dict(),
        "reproduces": not result.passed,
        "dropped_calls": recorder.dropped,
    }
    atomic_write(out / f"{stem}.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write_json(out / f"{stem}.json", meta)
    path = atomic_write_text(out / f"{stem}.py", script_text(call.op, stem))
    os.chmod(path, 0o755)
    return path


def _describe(ran: dict) -> str:
    if ran["plant"]:
        return f"the {ran['backend']!r} backend with the planted bug {ran['plant']!r}"
    if ran["replaced"]:
        return ran["impl"] or ran["replaced"]
    return f"the {ran['backend']!r} backend"


def run_and_extract(
    case_name: str, folder: Path, *, checkpoint: Path | None = None, device: str = "cpu", plant: str | None = None
) -> tuple[RunReport, list[Path]]:
    """`parity run CASE` (its synthetic checkpoint under `folder` unless one is given), then the kernel repros of
    its failure into `folder/repro/`: what `parity repro DIR --extract CASE` does."""
    case = load_case(case_name)
    folder = Path(folder)
    check_output_dir(folder / "repro", "repro folder")
    ckpt = prepare_checkpoint(case, checkpoint, folder)
    repros: list[Path] = []

    def extract(report: RunReport, captures: Captures) -> None:
        repros.extend(write_kernel_repros(report, folder, case=case, captures=captures))

    return run_case(case, ckpt, device, plant=plant, then=extract), repros

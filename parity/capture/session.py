"""A verdict's runs in one place (`Captures`): targets, the chained engine, the reference on the engine's schedule,
the teacher-forced engine and, when needed, the golden; and the judge over them. Used by `parity run`, the active
bisect, the selftest and the calibration, so every command captures and judges the same way."""

import time
from dataclasses import dataclass

from parity.capture import runs
from parity.capture.margins import flip_judges
from parity.compare.rows import RowStore
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import RequestLayout, Verdict, judge_run
from parity.errors import ParityError
from parity.progress import Progress, within

GOLDEN = ("auto", "always", "never")


@dataclass
class Captures:
    """The runs of one verdict, kept for judging again (other thresholds) and for dumping."""

    inputs: runs.RunInputs
    targets: runs.Targets
    layout: dict[str, RequestLayout]
    n_layers: int
    reference: runs.Capture
    forced: runs.Capture | None
    chained: runs.Capture
    golden: runs.Capture | None = None


def capture(
    inp: runs.RunInputs,
    transform_ops=None,
    timings: dict | None = None,
    forced: bool = True,
    progress: Progress | None = None,
) -> Captures:
    """Targets, chained engine, reference on the engine's schedule, forced engine (see the module docstring);
    `forced=False` skips the forced run (its capture is then None: for checks of the chained run alone)."""
    timings = {} if timings is None else timings
    n_layers = inp.args().n_layers

    def timed(label, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[label] = time.perf_counter() - t0
        return result

    tg = timed("targets", runs.targets, inp, progress=within(progress, "targets"))
    chained = timed("engine", runs.engine_capture, inp, tg, transform_ops=transform_ops, name="chained",
                    progress=within(progress, "chained"))  # fmt: skip
    first = chained.first_chunks()
    ref = timed("reference", runs.reference_capture, inp, tg, first, progress=within(progress, "reference"))
    layout = {str(i): RequestLayout(len(p), first[i]) for i, p in enumerate(inp.prompts)}
    c = Captures(inp, tg, layout, n_layers, ref, None, chained)
    return add_forced(c, transform_ops, timings, progress) if forced else c


def add_forced(
    c: Captures, transform_ops=None, timings: dict | None = None, progress: Progress | None = None
) -> Captures:
    """The engine again, teacher-forced at every site with the reference's values."""
    t0 = time.perf_counter()
    store = RowStore.from_dump(c.reference.dump, c.n_layers)
    own = runs.engine_capture(
        c.inputs, c.targets, force=store, transform_ops=transform_ops, progress=within(progress, "forced")
    )
    first = c.chained.first_chunks()
    if own.first_chunks() != first:
        raise ParityError(f"the forced engine run scheduled {own.first_chunks()}, the first run {first}")
    if timings is not None:
        timings["engine forced"] = time.perf_counter() - t0
    c.forced = own
    return c


def add_golden(c: Captures, timings: dict | None = None, progress: Progress | None = None) -> None:
    t0 = time.perf_counter()
    store = RowStore.from_dump(c.reference.dump, c.n_layers)
    first = [c.layout[str(i)].first_chunk for i in range(len(c.inputs.prompts))]
    c.golden = runs.reference_capture(
        c.inputs, c.targets, first, force=store, golden=True, name="golden", progress=within(progress, "golden")
    )
    if timings is not None:
        timings["golden"] = time.perf_counter() - t0


def judge(
    c: Captures, noise: NoiseModel, golden: str = "auto", timings: dict | None = None, progress: Progress | None = None
) -> Verdict:
    """The forced run's verdict; with golden "auto" the golden runs only when some row is over the dtype floor."""
    if golden not in GOLDEN:
        raise ParityError(f"golden must be one of {GOLDEN}, got {golden!r}")
    if golden == "always" and c.golden is None:
        add_golden(c, timings, progress)
    g = c.golden.dump if c.golden is not None else None
    rows = RowStore.from_dump(c.reference.dump, c.n_layers)  # read once: the judge's and the margins'
    margin, tie = flip_judges(c.inputs.ckpt, c.inputs.args(), rows, c.inputs.overrides)
    kw = dict(margin=margin, tie=tie, reference_rows=rows)
    verdict = judge_run(c.reference.dump, c.forced.dump, c.layout, c.n_layers, noise, golden=g, **kw)
    # the golden judges rows over the envelope, and rows within it taken together (verdict.floats)
    if golden == "auto" and c.golden is None and any(r.failures or r.suspects for r in verdict.results):
        add_golden(c, timings, progress)
        g = c.golden.dump
        verdict = judge_run(c.reference.dump, c.forced.dump, c.layout, c.n_layers, noise, golden=g, **kw)
    return verdict

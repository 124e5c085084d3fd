"""The selftest procedure: one clean capture, then one teacher-forced engine run per planted bug.

The reference, the targets and the engine's schedule do not depend on the optimized side (tokens and MTP drafts
are forced), so they are captured once; each bug costs one engine run (and shares the golden, run at most once).
A bug is caught when the verdict fails, and localized when its first failure is at the bug's layer, in one of its
sub-modules and phases (`bugs.Expect`). Clean repeats rerun the whole capture with other admission orders (other
batch compositions and schedules) and other seeds (other weights and prompts), and must all pass. The selftest
passes when every bug is caught and every clean run passes; localization is reported, and counted against
`min_localized`.
"""

import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from parity.capture import runs
from parity.capture.session import capture, judge
from parity.cases import Case
from parity.checkpoint import write_checkpoint
from parity.compare.rows import RowStore
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import Verdict
from parity.engines import only_optimized
from parity.run import run_inputs
from parity.selftest.bugs import Bug


@dataclass
class BugResult:
    name: str
    history: str
    expected: str
    caught: bool
    localized: bool
    location: str
    wall_s: float


@dataclass
class CleanResult:
    label: str
    passed: bool
    location: str


@dataclass
class SelftestReport:
    case: str
    noise: str
    clean: list[CleanResult] = field(default_factory=list)
    bugs: list[BugResult] = field(default_factory=list)
    min_localized: float = 0.9

    @property
    def caught(self) -> int:
        return sum(b.caught for b in self.bugs)

    @property
    def localized(self) -> int:
        return sum(b.localized for b in self.bugs)

    @property
    def passed(self) -> bool:
        return (
            all(c.passed for c in self.clean)
            and self.caught == len(self.bugs)
            and self.localized >= self.min_localized * len(self.bugs)
        )


def clean_variations(case: Case, repeats: int) -> list[tuple[str, Case, tuple[int, ...] | None]]:
    """`repeats` clean runs, alternating other admission orders (from the first permutation on; the calibration
    takes them from the last) and other seeds (other weights and prompts, from seed + 100 on; the calibration uses
    the next few seeds): variations the noise model was not measured on."""
    n = len(case.requests)
    orders = [p for p in itertools.permutations(range(n)) if list(p) != list(range(n))]
    out = []
    for i in range(repeats):
        if i % 2 == 0 and i // 2 < len(orders):
            o = orders[i // 2]
            out.append((f"order {list(o)}", case, tuple(o)))
        else:
            seed = case.seed + 100 + i
            out.append((f"seed {seed}", replace(case, seed=seed), None))
    return out


def _localized(v: Verdict, bug: Bug) -> bool:
    f = v.first
    e = bug.expect
    return f is not None and f.layer == e.layer and f.submodule in e.submodules and f.phase in e.phases


def _expected(bug: Bug) -> str:
    e = bug.expect
    return f"layer {e.layer}, {' or '.join(e.submodules)}, {' or '.join(e.phases)}"


def selftest_refuses(case: Case) -> None:
    """One line, before any work, for a case whose candidate is not the optimized engine: the bugs are planted
    into the optimized engine's ops and code, and the clean reruns vary its schedules."""
    only_optimized(case, "selftest", "its bugs are planted into the optimized engine only")


def selftest(
    case: Case,
    checkpoint,
    bugs: list[Bug],
    noise: NoiseModel,
    *,
    repeats: int = 1,
    device: str = "cpu",
    progress=None,
) -> SelftestReport:
    selftest_refuses(case)
    say = progress or (lambda msg: None)
    report = SelftestReport(case.name, noise.source)
    inp = run_inputs(case, checkpoint, device)
    say("clean capture (targets, engine, reference, forced engine)")
    c = capture(inp)
    v = judge(c, noise)
    report.clean.append(CleanResult("as given", v.passed, v.location()))
    store = RowStore.from_dump(c.reference.dump, c.n_layers)
    for bug in bugs:
        say(f"bug {bug.name}")
        t0 = time.perf_counter()
        try:
            with bug.patch():
                forced = runs.engine_capture(inp, c.targets, force=store, transform_ops=bug.ops, name=bug.name)
        except Exception as e:  # a planted bug that crashes the engine is a broken selftest, not a catch
            report.bugs.append(BugResult(bug.name, bug.history, _expected(bug), False, False, f"error: {e!r}", 0.0))
            continue
        planted = replace(c, forced=forced)
        v = judge(planted, noise)
        c.golden = planted.golden  # computed at most once, shared by every bug
        report.bugs.append(
            BugResult(
                bug.name,
                bug.history,
                _expected(bug),
                not v.passed,
                _localized(v, bug),
                v.location(),
                time.perf_counter() - t0,
            )  # fmt: skip
        )
    for label, var, order in clean_variations(case, repeats):
        say(f"clean repeat, {label}")
        ckpt = checkpoint
        if var.seed != case.seed:
            ckpt = write_checkpoint(Path(checkpoint).parent / f"seed{var.seed}", var.model_args(), seed=var.seed,
                                    init=var.init)  # fmt: skip
        ci = capture(run_inputs(var, ckpt, device, order=order))
        v = judge(ci, noise)
        report.clean.append(CleanResult(label, v.passed, v.location()))
    return report

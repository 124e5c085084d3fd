"""`parity calibrate`: measure how far each site legitimately moves, and store it as the case's noise model.

The legitimate variation of a non-bitwise engine comes from how the work is batched and scheduled, never from what
is computed. So a clean (bug-free) optimized engine is run, teacher-forced, under variations that change only that:
- the case as given;
- other admission orders of its requests (other batch compositions, slots and schedules);
- other chunk sizes and token budgets (other prefill splits, other mixes of chunks and decodes per step);
- other seeds (other synthetic weights and prompts: the same model family, other numbers).
Each site's largest own error (per field and phase), and the largest fraction of rows whose discrete choices
(experts, indexer top-k) flipped, are recorded; the thresholds are those maxima times the noise model's margin,
never below the floor of the field's dtype (`compare.thresholds`). The file records the measurements and their
provenance (the variations, the machine, torch, the date), not the policy.
"""

import datetime
import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from parity import machine
from parity.capture.session import capture
from parity.cases import Case
from parity.checkpoint import write_checkpoint
from parity.compare import sites
from parity.compare.thresholds import NoiseModel
from parity.compare.verdict import judge_run
from parity.engines import only_optimized
from parity.errors import ParityError
from parity.optimized.ops import OpsConfig
from parity.run import non_bitwise_ops, run_inputs


@dataclass(frozen=True)
class Variation:
    label: str
    case: Case
    order: tuple[int, ...] | None = None


def variations(case: Case, n: int) -> list[Variation]:
    """The case itself, then admission orders, schedules and seeds, interleaved, `n` in all."""
    k = len(case.requests)
    orders = [p for p in itertools.permutations(range(k)) if list(p) != list(range(k))]
    e = case.engine
    schedules = [
        replace(e, chunk_size=max(1, e.chunk_size // 2)),
        replace(e, token_budget=max(1, e.token_budget // 2)),
        replace(e, chunk_size=e.chunk_size + 7, token_budget=e.token_budget + 13),
    ]
    kinds = [
        [Variation(f"order {list(o)}", case, tuple(o)) for o in orders[::-1]],
        [Variation(f"chunk {s.chunk_size}, budget {s.token_budget}", replace(case, engine=s)) for s in schedules],
        [Variation(f"seed {case.seed + i}", replace(case, seed=case.seed + i)) for i in range(1, 100)],
    ]
    out = [Variation("as given", case)]
    for group in itertools.zip_longest(*kinds):
        out += [v for v in group if v is not None]
    return out[:n]


def calibrate_refuses(case: Case, ops: OpsConfig | None = None) -> None:
    """One line, before any work, for a case this job does not apply to: another candidate, or a decode-exact case
    whose selected ops all claim bitwise equality (judged bitwise: nothing to measure). A decode-exact case with a
    non-bitwise kernel selected is judged by a noise model (`run.noise_model`), so it is calibrated like any other."""
    only_optimized(
        case,
        "calibrate",
        "it varies the optimized engine's batching and schedules; measure this candidate's noise with "
        "`python -m parity.engines.hf_noise CASE --out FILE`",
    )
    if case.engine.decode_exact_chunks and not non_bitwise_ops(ops or OpsConfig.from_env()):
        raise ParityError(
            f"case {case.name!r} is decode-exact and every selected op is bitwise: it is judged bitwise and has no "
            "noise to calibrate (select the kernels to measure with PARITY_BACKEND or PARITY_OPS)"
        )


def calibrate(
    case: Case, work_dir: Path, n: int = 6, device: str = "cpu", progress: Callable[[str], None] | None = None
) -> NoiseModel:
    """Run `n` clean variations of `case` (checkpoints written under `work_dir`) on `device` with the ops selected
    by the environment, and return the measured model. Refused for a case whose candidate is not the optimized
    engine: the variations are its batching and schedules (HF's noise model: `python -m parity.engines.hf_noise`)."""
    calibrate_refuses(case)
    say = progress or (lambda msg: None)
    errors: dict[str, float] = {}
    flips: dict[str, float] = {}
    rows = 0
    done = []
    for i, var in enumerate(variations(case, n)):
        say(f"[{i + 1}/{n}] {var.label}")
        ckpt = write_checkpoint(
            work_dir / f"seed{var.case.seed}", var.case.model_args(), seed=var.case.seed, init=var.case.init
        )
        inp = run_inputs(var.case, ckpt, device, order=var.order)
        c = capture(inp)
        # judged with zero thresholds: every row's own error is measured, nothing is filtered
        v = judge_run(c.reference.dump, c.forced.dump, c.layout, c.n_layers, NoiseModel(exact=True))
        for r in v.results:
            if not r.compared:
                continue
            sp = sites.parse(r.path, c.n_layers)
            key = f"{sp.template}|{r.field}|{r.phase}"
            errors[key] = max(errors.get(key, 0.0), r.max_err)
            if sp.site.kind == "choice":
                flips[key] = max(flips.get(key, 0.0), r.flips / r.compared)
            rows += r.compared
        done.append(var.label)
    provenance = {
        "case": case.name,
        "case_source": case.source,
        "variations": done,
        "rows_measured": rows,
        "machine": machine.describe(),
        "device": device,
        "backends": inp.ops.backends(),
        "date": datetime.date.today().isoformat(),
        "method": "max own error (teacher-forced optimized engine vs reference) per site, field and phase",
    }
    return NoiseModel(errors=errors, flips=flips, provenance=provenance, source="calibration")

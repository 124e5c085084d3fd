"""Candidate engines: which implementation a case judges against the reference (`candidate = ...` in a case).

- `optimized` (default): parity's own engine (`parity.optimized`): ragged batches, chunked prefill, paged KV, MTP;
  captured by `parity.capture`.
- `transformers`: HF transformers' `DeepseekV4ForCausalLM`, one request at a time (`parity.engines.transformers`;
  `pip install 'parity[transformers]'`).

`parity.run.run_case` hands any case whose candidate is not `optimized` to `run_candidate` (its one dispatch
point); the candidate captures its runs its own way and is judged by the same verdict (docs/engines.md).
"""

import time
from pathlib import Path

from parity.cases import CANDIDATES, Case
from parity.compare.thresholds import NoiseModel
from parity.errors import ParityError

__all__ = ["CANDIDATES", "only_optimized", "run_candidate"]


def only_optimized(case: Case, command: str, why: str) -> None:
    """Refuse, with one line, a job that exists for the optimized engine only (`parity calibrate` varies its
    batching and schedules, `parity selftest` plants bugs into it) on a case that names another candidate."""
    if case.candidate != "optimized":
        raise ParityError(
            f"parity {command}: case {case.name!r} names candidate {case.candidate!r}; {why} (docs/engines.md)"
        )


def run_candidate(
    case: Case,
    checkpoint: Path,
    device: str = "cpu",
    dump_dir: Path | None = None,
    *,
    noise: NoiseModel | None = None,
    golden: str = "auto",
    bisect: bool = False,
    plant: str | None = None,
    plant_model=None,
):
    """`parity run` for a case whose candidate is not the optimized engine; a `parity.run.RunReport`.
    `plant_model(model)` edits the candidate's model before it runs (tests plant bugs with it)."""
    if case.candidate != "transformers":
        raise ParityError(f"case {case.name!r}: unknown candidate {case.candidate!r}; valid: {', '.join(CANDIDATES)}")
    if bisect or plant is not None:
        flag = "--bisect" if bisect else "--plant"
        raise ParityError(f"{flag}: only for the optimized engine; case {case.name!r} names candidate 'transformers'")
    if golden == "always":
        raise ParityError("--golden always: the transformers candidate is judged without the golden (docs/engines.md)")
    # parity.run imports this package (its dispatch point): its report types are read at call time
    from parity import run as main_job
    from parity.capture.save import save_run
    from parity.engines import transformers as hf

    t0 = time.perf_counter()
    inp = hf.hf_inputs(case, checkpoint, device)
    if noise is None:
        # never bitwise: HF's port rounds otherwise (bf16 router, bf16 compressor projections, no fake-quant)
        noise = NoiseModel.load(case.calibration) if case.calibration else NoiseModel(source="defaults (transformers)")
    out = hf.run_hf(inp, noise, plant=plant_model, off=case.quant_sim_off)
    loc = hf.location(out)
    report = main_job.RunReport(
        case=case.name,
        checkpoint=str(checkpoint),
        device=device,
        machine=hf.describe()["machine"],
        backends={"candidate": f"transformers {out.version}", "reference quant sim off": ",".join(case.quant_sim_off)},
        exact=False,
        noise=noise.source,
        passed=not loc,
        location=loc,
        sites=[r.to_row() for r in out.verdict.results],
        chained=[r.to_row() for r in out.chained.results],
        requests=hf.request_rows(out, main_job.RequestRow),
        forced_rows=sum(out.captures.forced.forced.values()),
        missed_rows=sum(out.captures.forced.missed.values()),
        timings=out.timings,
    )
    report.noise_provenance = dict(noise.provenance)
    if dump_dir is not None:
        save_run(out.captures, dump_dir, noise)
    report.wall_s = time.perf_counter() - t0
    return report

"""The noise model of a transformers-candidate case: HF's port against the reference, measured on clean runs.

HF's port is not bitwise with the reference even with the reference's quantization simulation off: it computes the
router's logits and weights in bf16 (the official gate: fp32), the experts' SwiGLU and the routing-weight product in
bf16 (official: fp32), the compressors' projections and pooling in bf16 (official: fp32), the mHC post-mix in bf16
and the query's head norm in another order. Those are properties of the port, not of batching, so the variations of
`parity calibrate` (orders, chunk sizes) do not apply; what does is other numbers: the case as given and other
seeds (other synthetic weights and prompts). Each site's largest own error (teacher-forced, per field and phase)
and flip fraction is recorded; thresholds are those times the margin (4), never below the dtype floor
(`compare.thresholds`), in the same file format as `parity calibrate` writes, with provenance.

    python -m parity.engines.hf_noise cases/hf_tiny.toml --out cases/hf_tiny.noise.json [--seeds 1,2]
"""

import argparse
import datetime
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from parity import machine
from parity.cases import Case, load_case
from parity.checkpoint import write_checkpoint
from parity.compare import sites
from parity.compare.thresholds import NoiseModel
from parity.errors import ParityError
from parity.io import check_output_file


def calibrate(case: Case, work_dir: Path, seeds: tuple[int, ...] = (1, 2), device: str = "cpu", say=print):
    """Measure HF's own error per site on `case` as given and with each of `seeds`; a `NoiseModel`."""
    from parity.engines import transformers as hf

    errors: dict[str, float] = {}
    flips: dict[str, float] = {}
    rows, done, version = 0, [], ""
    for seed in (case.seed, *[s for s in seeds if s != case.seed]):
        var = replace(case, seed=seed)
        label = "as given" if seed == case.seed else f"seed {seed}"
        say(f"{label}: checkpoint, reference, HF chained and forced")
        ckpt = write_checkpoint(work_dir / f"seed{seed}", var.model_args(), seed=seed, init=var.init)
        out = hf.run_hf(hf.hf_inputs(var, ckpt, device), NoiseModel(exact=True), off=case.quant_sim_off)
        if out.weights or out.missing:
            raise ParityError(f"hf_noise: {label}: {hf.location(out)}")
        n_layers = out.captures.n_layers
        for r in out.verdict.results:  # judged with zero thresholds: every row's own error measured
            if not r.compared:
                continue
            sp = sites.parse(r.path, n_layers)
            key = f"{sp.template}|{r.field}|{r.phase}"
            errors[key] = max(errors.get(key, 0.0), r.max_err)
            if sp.site.kind == "choice":
                flips[key] = max(flips.get(key, 0.0), r.flips / r.compared)
            rows += r.compared
        done.append(label)
        version = out.version
    provenance = {
        "case": case.name,
        "case_source": case.source,
        "candidate": f"transformers {version}",
        "reference_quant_sim_off": list(case.quant_sim_off),
        "variations": done,
        "rows_measured": rows,
        "machine": machine.describe(),
        "device": device,
        "date": datetime.date.today().isoformat(),
        "method": "max own error (teacher-forced HF DeepseekV4ForCausalLM vs reference) per site, field and phase",
        "command": "python -m parity.engines.hf_noise " + " ".join(sys.argv[1:]),
    }
    return NoiseModel(errors=errors, flips=flips, provenance=provenance, source="calibration")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.engines.hf_noise", description=__doc__.splitlines()[0])
    p.add_argument("case")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", default="1,2", help="other seeds, comma-separated (default 1,2)")
    a = p.parse_args(argv)
    try:
        case = load_case(a.case)
        if case.candidate != "transformers":
            raise ParityError(f"{a.case}: candidate is {case.candidate!r}; for the optimized engine: parity calibrate")
        seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
        check_output_file(a.out, "--out")
        with tempfile.TemporaryDirectory() as tmp:
            model = calibrate(case, Path(tmp), seeds)
        model.save(a.out)
    except ValueError:
        print(f"--seeds: expected integers separated by commas, got {a.seeds!r}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(str(e), file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

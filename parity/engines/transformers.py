"""HF transformers' DeepSeek-V4 port (`DeepseekV4ForCausalLM`) as a candidate engine: `candidate = "transformers"`.

`parity run` on such a case gives HF's port the same per-layer verdict as the optimized engine gets:

1. the reference runs with its KV and indexer quantization simulation off (`parity.engines.quant`: HF simulates
   neither), generates every request alone (the targets), then runs each request as one prefill plus one decode
   per token, recorded at every site;
2. HF's model is loaded from the same official-format checkpoint (`from_pretrained`, which dequantizes FP8/FP4 on
   CPU), its weights checked against the reference's, dequantized (`hf_weights`), and it runs each request the
   same way (prefill, then the reference's tokens one decode at a time), recorded through parity's taps attached
   by the built-in name map (`hf_taps`): once on its own (chained) and once teacher-forced at every site with
   the reference's values (each site's own error);
3. the verdict (`compare.verdict.judge_run`) judges every site of every layer row by row against the case's noise
   model; every site the reference recorded must have HF rows (none skipped), else the run fails naming the site.

No golden second opinion: the float64 golden swaps the same kernel seam the quantization switches use, so it would
turn the simulation back on; rows over the threshold fail. No MTP: HF's port has no MTP module.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from parity import dump, machine
from parity.capture import forcing, runs
from parity.capture.session import Captures
from parity.compare.loader import Dump
from parity.compare.rows import RowStore
from parity.compare.sites import tap_pattern
from parity.compare.verdict import RequestLayout, judge_run
from parity.engines import hf_weights
from parity.engines.hf_taps import HFTaps
from parity.engines.quant import SWITCHES, quant_sim_off
from parity.errors import ParityError
from parity.optimized.engine import EngineConfig
from parity.reference.generate import Generation

NAME = "transformers"
INSTALL = "pip install 'parity[transformers]'"


def require() -> tuple[object, object]:
    """(transformers, its deepseek_v4 modeling module), or one line saying how to install them."""
    try:
        import transformers
        from transformers.models.deepseek_v4 import modeling_deepseek_v4
    except ImportError as e:
        raise ParityError(
            f"candidate {NAME!r} needs HF transformers with models/deepseek_v4 (>= 5.23) and accelerate: {INSTALL} "
            f"({e})"
        ) from None
    return transformers, modeling_deepseek_v4


def load_model(ckpt: Path, device: str = "cpu") -> torch.nn.Module:
    """`DeepseekV4ForCausalLM` from an official-format checkpoint dir, eager attention, eval mode."""
    transformers, _ = require()
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    # its load report, its "dequantizing FP8 on CPU" notice and progress bars would interleave with parity's output
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(ckpt), dtype=torch.bfloat16, attn_implementation="eager", device_map=device
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ParityError(f"{ckpt}: transformers could not load the checkpoint: {first}") from None
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()
    return model.eval()


@contextmanager
def _query_tap(taps: HFTaps) -> Iterator[None]:
    """HF's attention modules call the modeling module's `eager_attention_forward` (looked up per call): wrap it
    so the query passes `attn.q` first (as the reference's capture wraps its `sparse_attn` seam)."""
    _, modeling = require()
    seam = modeling.eager_attention_forward

    def eager_attention_forward(module, query, *args, **kwargs):
        return seam(module, taps.query(module, query), *args, **kwargs)

    modeling.eager_attention_forward = eager_attention_forward
    try:
        yield
    finally:
        modeling.eager_attention_forward = seam


@dataclass
class HFRun:
    capture: runs.Capture
    logits: list[list[torch.Tensor]]  # per request, the fp32 logits that chose each emitted token


def hf_capture(
    model: torch.nn.Module,
    inp: runs.RunInputs,
    tg: runs.Targets,
    *,
    force: RowStore | None = None,
    name: str = NAME,
) -> HFRun:
    """Every request through HF's model alone: its prompt as one prefill, then the reference's tokens one decode at
    a time (teacher-forced tokens), every site recorded (and forced from `force`)."""
    from transformers import DynamicCache

    n_layers = len(model.model.layers)
    writer = dump.MemoryWriter()
    taps = HFTaps(model)
    handle = dump.install(taps.tree, dump.DumpConfig(modules=tap_pattern()), writer=writer)
    forcer = forcing.Forcing(taps.tree, force, forcing.everything, n_layers) if force is not None else None
    logits: list[list[torch.Tensor]] = []
    step = 0
    device = next(model.parameters()).device
    try:
        with _query_tap(taps), torch.inference_mode():
            for i, prompt in enumerate(inp.prompts):
                cache = DynamicCache(config=model.config)
                taps.bind_cache(cache)
                feed = [prompt.tolist()] + [[t] for t in tg.tokens[i][: inp.decode_steps[i]]]
                pos, mine = 0, []
                for ids in feed:
                    taps.start_pos, taps.n_tokens = pos, len(ids)
                    phase = "prefill" if pos == 0 else "decode"
                    x = torch.tensor([ids], dtype=torch.int64, device=device)
                    positions = torch.arange(pos, pos + len(ids), device=device)[None]
                    with dump.phase(phase, step, cu_seqlens=[0, len(ids)], requests=[i], start_pos=[pos]):
                        out = model(
                            input_ids=x, position_ids=positions, past_key_values=cache, use_cache=True,
                            logits_to_keep=1,
                        )  # fmt: skip
                    mine.append(out.logits[0, -1].float())
                    pos, step = pos + len(ids), step + 1
                logits.append(mine)
    finally:
        handle.remove()
        taps.remove()
        if forcer is not None:
            forcer.remove()
    cap = runs.Capture(Dump.from_memory(writer, name))
    if forcer is not None:
        cap.forced, cap.missed = dict(forcer.forced), dict(forcer.missed)
    return HFRun(cap, logits)


def hf_inputs(case, ckpt: Path, device: str = "cpu") -> runs.RunInputs:
    """What the reference's and HF's runs share: the case's prompts and decode counts on `ckpt` (no engine
    settings apply: HF runs one request at a time, every prompt as one prefill; no MTP)."""
    args = case.model_args()
    prompts = case.prompts(args.vocab_size)
    return runs.RunInputs(
        ckpt=Path(ckpt),
        prompts=tuple(prompts),
        decode_steps=tuple(r.decode_steps for r in case.requests),
        engine=EngineConfig(max_requests=len(prompts), mtp_draft=0),
        device=device,
        overrides=case.overrides,
    )


def reference_runs(inp: runs.RunInputs, off: tuple[str, ...] = SWITCHES):
    """Targets and the reference on HF's schedule (each prompt one prefill), quantization simulation `off`."""
    with quant_sim_off(off):
        tg = runs.targets(inp)
        ref = runs.reference_capture(inp, tg, [len(p) for p in inp.prompts])
    return tg, ref


def missing_sites(reference: Dump, candidate: Dump) -> list[str]:
    """Site records (path:field) the reference has and the candidate does not: the name map's gaps."""

    def fields(d: Dump) -> set[str]:
        return {f"{r.module}:{r.field}" for r in d.records if r.kind == "activation" and r.io == "output"}

    return sorted(fields(reference) - fields(candidate))


@dataclass
class HFOutcome:
    """What `run_hf` produced: the captures (as `parity run --dump` saves them), verdicts, and checks."""

    captures: Captures
    verdict: object
    chained: object
    weights: list[str]
    missing: list[str]
    logits: list[list[torch.Tensor]]
    timings: dict[str, float]
    version: str

    @property
    def reference_runs(self) -> tuple[runs.Targets, runs.Capture]:
        return self.captures.targets, self.captures.reference


def run_hf(
    inp: runs.RunInputs,
    noise,
    *,
    plant: Callable[[torch.nn.Module], None] | None = None,
    off: tuple[str, ...] = SWITCHES,
    timings: dict | None = None,
    reference: tuple[runs.Targets, runs.Capture] | None = None,
) -> HFOutcome:
    """The HF candidate against the reference on `inp` (module docstring). `plant(model)` edits HF's model after
    the weight check (tests plant bugs with it); `reference` reuses an earlier outcome's `(targets, reference)`
    (`HFOutcome.reference_runs`) captured with the same switches."""
    transformers, _ = require()
    if inp.mtp:
        raise ParityError(f"candidate {NAME!r}: HF's port has no MTP module; set engine.mtp_draft = 0")
    timings = {} if timings is None else timings

    def timed(label, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[label] = time.perf_counter() - t0
        return result

    tg, ref = reference if reference is not None else timed("reference", reference_runs, inp, off)
    model = timed("load", load_model, inp.ckpt, inp.device)
    weights = timed("weights", hf_weights.compare, model, inp.ckpt, inp.device)
    if plant is not None:
        plant(model)
    n_layers = inp.args().n_layers
    chained = timed("candidate", hf_capture, model, inp, tg, name="chained")
    store = RowStore.from_dump(ref.dump, n_layers)
    forced = timed("candidate forced", hf_capture, model, inp, tg, force=store, name="forced")
    layout = {str(i): RequestLayout(len(p), len(p)) for i, p in enumerate(inp.prompts)}
    c = Captures(inp, tg, layout, n_layers, ref, forced.capture, chained.capture)
    t0 = time.perf_counter()
    verdict = judge_run(ref.dump, forced.capture.dump, layout, n_layers, noise, reference_rows=store)
    chained_verdict = judge_run(ref.dump, chained.capture.dump, layout, n_layers, noise, reference_rows=store)
    timings["judge"] = time.perf_counter() - t0
    missing = missing_sites(ref.dump, forced.capture.dump)
    return HFOutcome(c, verdict, chained_verdict, weights, missing, chained.logits, timings, transformers.__version__)


def request_rows(out: HFOutcome, row_type) -> list:
    """HF's own greedy choices (chained run) and logits against the reference's, per request."""
    rows = []
    c = out.captures
    for i, prompt in enumerate(c.inputs.prompts):
        want: Generation = c.reference.generations[i]
        mine = out.logits[i]
        n = min(len(mine), len(want.logits))
        greedy = all(int(a.argmax()) == int(b.argmax()) for a, b in zip(mine[:n], want.logits[:n]))
        err = max(
            (float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))
             for a, b in zip(mine[:n], want.logits[:n])),
            default=0.0,
        )  # fmt: skip
        rows.append(row_type(i, len(prompt), len(prompt), len(mine), greedy, err, "-"))
    return rows


def location(out: HFOutcome) -> str:
    """The first failure: a weight HF loaded otherwise, a site with no HF rows, or the verdict's location."""
    if out.weights:
        more = f" (and {len(out.weights) - 1} more)" if len(out.weights) > 1 else ""
        return f"weights: {out.weights[0]}{more}"
    if out.missing:
        return f"sites the name map did not line up (no HF rows): {', '.join(out.missing[:8])}"
    missed = sum(out.captures.forced.missed.values())
    if missed and out.verdict.passed:
        return f"teacher forcing found no reference value for {missed} rows: the runs are not aligned"
    return out.verdict.location()


def describe() -> dict:
    """The candidate's software, for the report's `backends` and `machine` fields."""
    transformers, _ = require()
    return {"candidate": f"transformers {transformers.__version__}", "machine": machine.describe()}

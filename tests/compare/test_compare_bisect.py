"""bisect(): a pure walk over judged pairs (unit-tested on hand-built rows), and on real dumps of a toy model with a
fault planted at a known layer and phase it names exactly that layer, phase, step and module."""

import pytest
import torch

from parity import dump
from parity.compare import PairResult, Thresholds, bisect, compare_dumps, load_dump
from parity.compare.metrics import TensorMetrics
from parity.dump.format import Record
from tests.dump.toymodel import N_LAYERS, Fault, ToyLM, prompts, run

# every block and its two sub-modules, so the verdict can name the sub-module
CONFIG = dict(modules=r"^layers\.\d+(\.(attn|ffn))?$|^head$")


def _row(order, phase, step, layer, sub="", passed=True, cos=1.0, missing=None) -> PairResult:
    module = f"layers.{layer}{sub}"
    record = Record(
        seq=order,
        run="r",
        kind="activation",
        name=f"{module}:out",
        module=module,
        field="out",
        shape=(2,),
        dtype="float32",
        layer=layer,
        block=f"layers.{layer}",
        phase=phase,
        step=step,
    )
    metrics = TensorMetrics(numel=2, bitwise=passed, cos=cos, rel_diff=1 - cos, norm_ratio=1.0)
    return PairResult(
        order=order,
        record=record,
        name=record.name,
        status="pass" if passed else "fail",
        reasons=() if passed else ("cos",),
        metrics=metrics,
        missing=missing,
    )


def test_pure_walk_names_the_first_failure_and_builds_the_curve():
    rows = [
        _row(0, "prefill", 0, 0, ".attn"),
        _row(1, "prefill", 0, 0),
        _row(2, "prefill", 0, 1, ".attn"),
        _row(3, "prefill", 0, 1),
        _row(4, "decode", 1, 0, ".attn"),
        _row(5, "decode", 1, 0, ".ffn", passed=False, cos=0.9),
        _row(6, "decode", 1, 0, passed=False, cos=0.95),
        _row(7, "decode", 1, 1, passed=False, cos=0.8),
    ]
    report = bisect(list(reversed(rows)))  # order comes from `order`, not from the list
    assert report.first is rows[5] and not report.passed
    curve = [(p.phase, p.step, p.block, p.records, p.failed, p.min_cos, p.first_failure) for p in report.curve]
    assert curve == [
        ("prefill", 0, "layers.0", 2, 0, 1.0, None),
        ("prefill", 0, "layers.1", 2, 0, 1.0, None),
        ("decode", 1, "layers.0", 3, 2, 0.9, "layers.0.ffn:out"),
        ("decode", 1, "layers.1", 1, 1, 0.8, "layers.1:out"),
    ]


def test_pure_walk_passes_clean_rows_and_reports_missing_separately():
    clean = [_row(i, "prefill", 0, i) for i in range(3)]
    assert bisect(clean).passed and bisect(clean).first is None
    missing = dict(passed=False, missing="b")
    report = bisect([*clean, _row(3, "prefill", 0, 3, **missing)])
    assert report.first is None and len(report.unmatched) == 1 and not report.passed
    assert [p.block for p in report.curve] == ["layers.0", "layers.1", "layers.2"]


@pytest.fixture(scope="module")
def toy_inputs():
    return prompts(batch=3, seq=6, decode_steps=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy_inputs):
    path = tmp_path_factory.mktemp("ref")
    run(ToyLM(), *toy_inputs, dump.DumpConfig(dir=path, **CONFIG))
    return load_dump(path)


@pytest.mark.parametrize(
    ("layer", "phase", "kind", "dtype", "module"),
    [
        pytest.param(0, "prefill", "ffn-scale", torch.float32, "ffn", id="L0-prefill-ffn"),
        pytest.param(2, "prefill", "ffn-scale", torch.float32, "ffn", id="L2-prefill-ffn"),
        pytest.param(4, "prefill", "attn-count", torch.float32, "attn", id="L4-prefill-attn"),
        pytest.param(1, "decode", "attn-count", torch.float32, "attn", id="L1-decode-attn"),
        pytest.param(3, "decode", "ffn-scale", torch.float32, "ffn", id="L3-decode-ffn"),
        pytest.param(3, "prefill", "ffn-scale", torch.bfloat16, "ffn", id="L3-prefill-ffn-bf16"),
        pytest.param(2, "decode", "attn-count", torch.bfloat16, "attn", id="L2-decode-attn-bf16"),
    ],
)
def test_planted_fault_is_found_at_its_layer_and_phase(
    tmp_path, reference, toy_inputs, layer, phase, kind, dtype, module
):
    run(ToyLM(fault=Fault(layer, phase, kind)).to(dtype), *toy_inputs, dump.DumpConfig(dir=tmp_path, **CONFIG))
    # the bf16 candidates change every dtype on purpose
    results = compare_dumps(reference, load_dump(tmp_path), thresholds=Thresholds(allow_dtype_change=True))
    report = bisect(results)
    first = report.first.record
    step = 0 if phase == "prefill" else 1
    assert (first.phase, first.step, first.layer, first.module) == (phase, step, layer, f"layers.{layer}.{module}")
    # everything before the fault passes: error introduced at `layer`, only inherited after it
    failing_before = [p for p in report.curve if not p.passed][0]
    assert (failing_before.phase, failing_before.block) == (phase, f"layers.{layer}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_clean_candidate_passes(tmp_path, reference, toy_inputs, dtype):
    """Identical weights in fp32 (bitwise) or in bf16 (rounding noise only) pass the default thresholds."""
    run(ToyLM().to(dtype), *toy_inputs, dump.DumpConfig(dir=tmp_path, **CONFIG))
    report = bisect(compare_dumps(reference, load_dump(tmp_path), thresholds=Thresholds(allow_dtype_change=True)))
    assert report.passed and len(report.curve) == (N_LAYERS + 1) * 3


def test_a_small_scale_fault_is_caught_by_the_norm_gate_not_by_cos(tmp_path, toy_inputs):
    """A block output scaled by 1.05: cos stays 1, the norm ratio catches it (without it the fault goes unseen)."""
    ref_dir, bad_dir = tmp_path / "ref", tmp_path / "bad"
    model = ToyLM()
    run(model, *toy_inputs, dump.DumpConfig(dir=ref_dir))
    hook = model.layers[2].register_forward_hook(lambda m, a, out: (out[0] * 1.05, out[1]))
    run(model, *toy_inputs, dump.DumpConfig(dir=bad_dir))
    hook.remove()
    results = compare_dumps(load_dump(ref_dir), load_dump(bad_dir))
    first = bisect(results).first
    assert first.name == "layers.2:out.0" and first.metrics.cos > 0.99999 and "norm ratio" in first.reasons[0]
    loose = compare_dumps(load_dump(ref_dir), load_dump(bad_dir), thresholds=Thresholds(max_norm_dev=None))
    assert bisect(loose).passed


def test_results_are_truthy_on_pass():
    ok, bad = _row(0, "prefill", 0, 0), _row(1, "prefill", 0, 1, passed=False, cos=0.5)
    assert ok and not bad and bisect([ok]) and not bisect([ok, bad])

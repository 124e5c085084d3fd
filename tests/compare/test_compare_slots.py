"""slot_invariance(): finds a planted slot-dependent op at its layer and phase; batch vs solo runs; bad input."""

import pytest
import torch

from parity import dump
from parity.compare import Thresholds, layer_summary, load_dump, slot_invariance
from parity.errors import ParityError
from tests.dump.toymodel import Fault, ToyLM, prompts, run

CONFIG = dict(modules=r"^layers\.\d+$")


def _same_prompt_in_every_slot(batch: int):
    tokens, decode = prompts(batch=1, seq=6, decode_steps=2)
    return tokens.expand(batch, -1).contiguous(), decode.expand(-1, batch, -1).contiguous()


def test_identical_slots_pass(tmp_path):
    run(ToyLM(), *_same_prompt_in_every_slot(4), dump.DumpConfig(dir=tmp_path, **CONFIG))
    report = slot_invariance(load_dump(tmp_path))
    assert report.passed and report.assumed_same and len(report.rows) == 5 * 2 * 3 * 3  # layers*fields*steps*slots


@pytest.mark.parametrize(
    ("layer", "phase", "step"),
    [
        pytest.param(0, "prefill", 0, id="L0-prefill"),
        pytest.param(3, "prefill", 0, id="L3-prefill"),
        pytest.param(2, "decode", 1, id="L2-decode"),
        pytest.param(4, "decode", 1, id="L4-decode"),
    ],
)
def test_slot_dependent_op_found_at_its_layer(tmp_path, layer, phase, step):
    model = ToyLM(fault=Fault(layer, phase, "slot-scale"))
    run(model, *_same_prompt_in_every_slot(3), dump.DumpConfig(dir=tmp_path, **CONFIG))
    report = slot_invariance(load_dump(tmp_path))
    first = report.first
    assert (first.record.phase, first.record.step, first.record.layer, first.slot) == (phase, step, layer, 1)
    assert first.against == "slot 0" and first.reasons == ("not bitwise equal",)
    summary = layer_summary(report)
    bad = next(s for s in summary if s["status"] == "fail")
    assert (bad["phase"], bad["block"], bad["slots_differ"]) == (phase, f"layers.{layer}", "1,2")


def test_batch_mate_leak_found_between_slots_of_one_request(tmp_path):
    """Slots 0 and 2 hold request "a" beside different mates: a leak from the neighbour makes them differ."""
    tokens, decode = prompts(batch=4, seq=5, decode_steps=1)
    tokens[2], decode[:, 2] = tokens[0], decode[:, 0]
    run(
        ToyLM(fault=Fault(1, "prefill", "mate-leak")),
        tokens,
        decode,
        dump.DumpConfig(dir=tmp_path, **CONFIG),
        requests=["a", "m", "a", "n"],
    )
    report = slot_invariance(load_dump(tmp_path))
    assert not report.assumed_same and {r.request for r in report.rows} == {"a"}
    assert (report.first.record.layer, report.first.slot, report.first.against) == (1, 2, "slot 0")
    clean = tmp_path / "clean"
    run(ToyLM(), tokens, decode, dump.DumpConfig(dir=clean, **CONFIG), requests=["a", "m", "a", "n"])
    assert slot_invariance(load_dump(clean)).passed


def test_batch_against_solo_runs(tmp_path):
    tokens, decode = prompts(batch=2, seq=5, decode_steps=2)
    run(ToyLM(), tokens, decode, dump.DumpConfig(dir=tmp_path / "batch", **CONFIG), requests=["a", "b"])
    for i, req in enumerate("ab"):
        run(
            ToyLM(),
            tokens[i : i + 1],
            decode[:, i : i + 1],
            dump.DumpConfig(dir=tmp_path / req, **CONFIG),
            requests=[req],
        )
    solos = [load_dump(tmp_path / r) for r in "ab"]
    report = slot_invariance(load_dump(tmp_path / "batch"), solos)
    assert report.passed and {(r.slot, r.against.split()[0]) for r in report.rows} == {(0, "solo"), (1, "solo")}
    leak = tmp_path / "leak"
    run(
        ToyLM(fault=Fault(3, "decode", "mate-leak")),
        tokens,
        decode,
        dump.DumpConfig(dir=leak, **CONFIG),
        requests=["a", "b"],
    )
    first = slot_invariance(load_dump(leak), solos).first
    assert (first.record.phase, first.record.step, first.record.layer) == ("decode", 1, 3)
    # a tolerance can absorb the leak (1e-3 of a neighbour): the gate is the caller's choice, exact by default
    loose = Thresholds(min_cos=0.99, max_norm_dev=None)
    assert slot_invariance(load_dump(leak), solos, thresholds=loose).passed


def test_nothing_to_compare_is_bad_input(tmp_path):
    model = ToyLM()
    with dump.install(model, dump.DumpConfig(dir=tmp_path, **CONFIG)), dump.phase("prefill"):
        model(torch.zeros(2, 3, dtype=torch.long))  # no seq layout tagged
    with pytest.raises(ParityError, match="nothing to compare"):
        slot_invariance(load_dump(tmp_path))


def test_solo_without_request_ids_only_stands_for_untagged_batches(tmp_path):
    same_tokens, same_decode = _same_prompt_in_every_slot(3)
    run(ToyLM(), same_tokens, same_decode, dump.DumpConfig(dir=tmp_path / "batch", **CONFIG))
    run(ToyLM(), same_tokens[:1], same_decode[:, :1], dump.DumpConfig(dir=tmp_path / "solo", **CONFIG))
    report = slot_invariance(load_dump(tmp_path / "batch"), [load_dump(tmp_path / "solo")])
    assert report.passed and sum(r.against.startswith("solo") for r in report.rows) == 5 * 2 * 3 * 3
    tokens, decode = prompts(batch=2, seq=6, decode_steps=2)
    run(ToyLM(), tokens, decode, dump.DumpConfig(dir=tmp_path / "tagged", **CONFIG), requests=["a", "b"])
    with pytest.raises(ParityError, match="nothing to compare"):
        slot_invariance(load_dump(tmp_path / "tagged"), [load_dump(tmp_path / "solo")])

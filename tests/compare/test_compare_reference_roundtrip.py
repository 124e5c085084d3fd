"""dump -> compare round trip on the DeepSeek-V4 reference model (tiny config, synthetic checkpoint).

Two fresh models from one checkpoint dump identical records; a fault planted at a known layer and phase (a forward
hook standing in for a kernel bug) is named by bisect; dumping does not change what the model computes.
"""

import pytest
import torch

from parity import dump
from parity.compare import bisect, compare_dumps, load_dump

PREFILL, DECODES = 12, 2
CONFIG = dict(modules=r"^(layers|mtp)\.\d+(\.(attn|ffn))?$")


@torch.inference_mode()
def _generate(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, decode and MTP drafts for a batch of 2, tagged as a runner would tag them; returns every logits."""
    b = tokens.shape[0]
    with dump.phase("prefill", step=0, batch=b):
        h = model.forward_streams(tokens[:, :PREFILL], 0)
        logits = [model.logits(h)]
    with dump.phase("mtp-draft", step=0, batch=b):
        logits.append(model.mtp[0](h, 0, tokens[:, 1 : PREFILL + 1]))
    for step, pos in enumerate(range(PREFILL, PREFILL + DECODES), start=1):
        with dump.phase("decode", step=step, batch=b):
            h = model.forward_streams(tokens[:, pos : pos + 1], pos)
            logits.append(model.logits(h))
        with dump.phase("mtp-draft", step=step, batch=b):
            logits.append(model.mtp[0](h, pos, tokens[:, pos + 1 : pos + 2]))
    return logits


def _dumped_run(model, tokens, path, **config) -> list[torch.Tensor]:
    with dump.install(model, dump.DumpConfig(dir=path, **(CONFIG | config))):
        return _generate(model, tokens)


def _fault_in(phase: str):
    """A forward hook that scales a module's output by 1.5 during one phase: a dropped / doubled scale factor."""

    def hook(module, args, out):
        return out * 1.5 if dump.current_tags().phase == phase else out

    return hook


@pytest.fixture
def reference_dump(make_model, tokens, tmp_path):
    _dumped_run(make_model(), tokens, tmp_path / "ref")
    return load_dump(tmp_path / "ref")


def test_two_runs_of_the_reference_model_match_bitwise(make_model, tokens, tmp_path, reference_dump):
    _dumped_run(make_model(), tokens, tmp_path / "again")
    results = compare_dumps(reference_dump, load_dump(tmp_path / "again"))
    assert results and all(r.status == "pass" and r.metrics.bitwise for r in results)
    assert {r.record.phase for r in results} == {"prefill", "decode", "mtp-draft"}
    streams = [r for r in results if r.name == "layers.3:out"]
    assert streams[0].shape_a == (2, PREFILL, 4, 256) and streams[0].dtype_a == "bfloat16"
    assert bisect(results).passed


@pytest.mark.parametrize(
    ("module", "phase", "step", "layer"),
    [
        pytest.param("layers.2.ffn", "prefill", 0, 2, id="L2-ffn-prefill"),
        pytest.param("layers.1.attn", "decode", 1, 1, id="L1-attn-decode"),
        pytest.param("mtp.0.attn", "mtp-draft", 0, 0, id="mtp-attn-draft"),
    ],
)
def test_planted_fault_is_named_by_bisect(make_model, tokens, tmp_path, reference_dump, module, phase, step, layer):
    model = make_model()
    model.get_submodule(module).register_forward_hook(_fault_in(phase))
    _dumped_run(model, tokens, tmp_path / "bad")
    first = bisect(compare_dumps(reference_dump, load_dump(tmp_path / "bad"))).first
    assert (first.record.phase, first.record.step, first.record.layer, first.record.module) == (
        phase,
        step,
        layer,
        module,
    )


def test_dumping_does_not_change_the_model_output(make_model, tokens, tmp_path):
    plain = _generate(make_model(), tokens)
    dumped = _dumped_run(make_model(), tokens, tmp_path / "both", what="both", weights=True, layers="1")
    assert all(torch.equal(a, b) for a, b in zip(plain, dumped, strict=True))


def test_weights_dump_checks_both_sides_loaded_the_same_weights(make_model, tmp_path):
    config = dump.DumpConfig(dir=tmp_path / "a", layers="1", weights=True, modules=r"\.attn\.")
    dump.install(make_model(), config).remove()
    other = make_model()
    with torch.no_grad():
        other.layers[1].attn.wkv.weight.view(torch.uint8)[0, 0] ^= 1  # one fp8 weight, one bit
    dump.install(other, dump.DumpConfig(dir=tmp_path / "b", layers="1", weights=True, modules=r"\.attn\.")).remove()
    a = load_dump(tmp_path / "a")
    assert {a.load(r).dtype for r in a.records} >= {torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.bfloat16}
    failed = [r.name for r in compare_dumps(a, load_dump(tmp_path / "b")) if r.status == "fail"]
    assert failed == ["layers.1.attn.wkv.weight"]

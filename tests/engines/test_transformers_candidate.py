"""HF transformers' DeepseekV4ForCausalLM as a candidate: every site the reference records lines up (none skipped),
HF loaded the checkpoint's weights exactly, and bugs planted into HF's model at a known layer are named there.
Skipped cleanly where transformers (the `transformers` extra) is not installed."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("transformers.models.deepseek_v4")

from parity.cases import parse_case  # noqa: E402
from parity.checkpoint import write_checkpoint  # noqa: E402
from parity.compare import sites  # noqa: E402
from parity.compare.thresholds import NoiseModel  # noqa: E402
from parity.compare.verdict import judge_run  # noqa: E402
from parity.engines import hf_weights  # noqa: E402
from parity.engines import transformers as hf  # noqa: E402
from parity.errors import ParityError  # noqa: E402

# one request crosses the HCA ratio (128) and the window; one is short; decodes complete CSA entries
CASE = {
    "name": "hf_test",
    "candidate": "transformers",
    "model": {"preset": "tiny", "overrides": {"dtype": "bf16", "n_mtp_layers": 0}},
    "requests": [{"prompt_len": 131, "decode_steps": 3}, {"prompt_len": 9, "decode_steps": 3}],
    "engine": {"mtp_draft": 0, "decode_exact_chunks": False},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    case = parse_case(CASE, "hf_test.toml")
    ckpt = write_checkpoint(tmp_path_factory.mktemp("hf_ckpt"), case.model_args(), seed=0)
    inp = hf.hf_inputs(case, ckpt)
    clean = hf.run_hf(inp, NoiseModel(exact=True), off=case.quant_sim_off)
    return inp, clean


def envelope(out) -> NoiseModel:
    """HF's own clean errors on this machine, per site, field and phase: the thresholds the planted runs face."""
    n = out.captures.n_layers
    errors = {}
    for r in out.verdict.results:
        if r.compared:
            key = f"{sites.parse(r.path, n).template}|{r.field}|{r.phase}"
            errors[key] = max(errors.get(key, 0.0), r.max_err)
    return NoiseModel(errors=errors, source="measured in the test")


def test_every_reference_site_lines_up(setup):
    inp, out = setup
    assert out.weights == [] and out.missing == []
    assert sum(out.captures.forced.missed.values()) == 0  # every forced HF row found the reference's value
    n = out.captures.n_layers

    def paths(dump):
        return {(r.module, r.field) for r in dump.records if r.kind == "activation" and r.io == "output"}

    ref, forced = paths(out.captures.reference.dump), paths(out.captures.forced.dump)
    assert ref == forced
    # every site of every layer's type is there: CSA layers carry both compressors and the indexer, HCA one
    kinds = {sites.parse(p, n).template for p, _ in ref}
    assert {"layers.*.attn.indexer.topk", "layers.*.attn.indexer.compressor.entries", "output_logits"} <= kinds
    assert {s.name for s in sites.BLOCK_SITES} == {sites.parse(p, n).site.name for p, _ in ref if p != "output_logits"}
    results = [r for r in out.verdict.results if r.rows]
    assert results and all(r.compared == r.rows for r in results)


def test_like_with_like_agrees_closely(setup):
    inp, out = setup
    # the same greedy tokens on the prefill and most sites exact after forcing (HF's port vs the reference with its
    # quantization simulation off): the name map pairs the right tensors
    ref_logits = out.captures.reference.generations
    assert all(int(a[0].argmax()) == int(b.logits[0].argmax()) for a, b in zip(out.logits, ref_logits))
    bitwise = {r.path.split(".", 2)[-1] for r in out.verdict.results if r.bitwise and r.compared}
    assert {"attn.input", "attn.qr", "attn.kv", "attn.output", "ffn.input"} <= bitwise


@pytest.mark.parametrize(
    ("layer", "module", "site", "submodule"),
    [
        (2, "self_attn.o_b_proj", "layers.2.attn.output", "attention output projection"),
        (3, "mlp.gate", "layers.3.ffn.route", "gate"),
        (1, "self_attn.compressor.indexer.kv_norm", "layers.1.attn.indexer.compressor.entries", "indexer compressor"),
    ],
)
def test_planted_bug_is_named_at_its_layer(setup, layer, module, site, submodule):
    inp, clean = setup
    noise = envelope(clean)
    assert judge_run(clean.captures.reference.dump, clean.captures.forced.dump, clean.captures.layout,
                     clean.captures.n_layers, noise).passed  # fmt: skip

    def plant(model):
        target = model.model.layers[layer].get_submodule(module)

        def scale(m, args, out):
            if isinstance(out, tuple):  # the router: (logits, weights, ids)
                return out[0], out[1] * 1.1, out[2]
            return out * 1.1

        target.register_forward_hook(scale)

    out = hf.run_hf(inp, noise, plant=plant, reference=clean.reference_runs)
    first = out.verdict.first
    assert not out.verdict.passed and first is not None
    assert (first.layer, first.path, first.submodule) == (layer, site, submodule)
    assert f"layer {layer} {submodule}" in hf.location(out)
    # a gate loose enough lets it through: the thresholds, not luck, caught it
    c = out.captures
    assert judge_run(c.reference.dump, c.forced.dump, c.layout, c.n_layers, noise.loosened(1e4)).passed


def test_weight_check_names_a_changed_fused_expert(setup):
    inp, _ = setup
    model = hf.load_model(inp.ckpt)
    assert hf_weights.compare(model, inp.ckpt) == []
    experts = model.model.layers[2].mlp.experts
    inter = experts.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        experts.gate_up_proj[3, inter + 5, 7] += 1.0  # w3 of expert 3, in HF's fused tensor
    assert hf_weights.compare(model, inp.ckpt) == [
        "layers.2.ffn.experts.3.w3.weight: 1 of 32768 values differ in HF's model.layers.2.mlp.experts.gate_up_proj"
    ]


def test_a_site_without_hf_rows_fails_naming_it(setup):
    _, out = setup
    forced = out.captures.forced.dump
    dropped = dataclasses.replace(forced, records=[r for r in forced.records if r.module != "layers.1.attn.kv"])
    assert hf.missing_sites(out.captures.reference.dump, dropped) == ["layers.1.attn.kv:out"]
    broken = dataclasses.replace(out, missing=hf.missing_sites(out.captures.reference.dump, dropped))
    assert hf.location(broken) == "sites the name map did not line up (no HF rows): layers.1.attn.kv:out"


def test_a_dir_transformers_cannot_load_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ParityError, match="transformers could not load the checkpoint") as e:
        hf.load_model(tmp_path)
    assert "\n" not in str(e.value)


def test_hf_noise_refuses_a_case_of_the_optimized_engine(tmp_path, capsys):
    from parity.engines import hf_noise

    assert hf_noise.main(["tiny", "--out", str(tmp_path / "n.json")]) == 2
    assert "candidate is 'optimized'; for the optimized engine: parity calibrate" in capsys.readouterr().err
    assert not (tmp_path / "n.json").exists()


def test_parity_run_dispatches_an_hf_case_and_saves_its_runs(setup, tmp_path):
    from parity.capture.save import load_run
    from parity.run import run_case

    inp, _ = setup
    case = parse_case({**CASE, "requests": [{"prompt_len": 9, "decode_steps": 2}]}, "hf_small.toml")
    # plumbing only (the gate is proven above): thresholds loose enough for any machine's rounding
    report = run_case(case, inp.ckpt, dump_dir=tmp_path / "dump", noise=NoiseModel().loosened(1e4))
    assert report.passed and report.location == "" and report.missed_rows == 0 and report.forced_rows > 0
    assert report.backends["candidate"].startswith("transformers ") and report.exact is False
    assert [(r.prompt_len, r.tokens) for r in report.requests] == [(9, 3)]
    saved = load_run(tmp_path / "dump")
    assert saved.forced is not None and saved.layout == {"0": saved.layout["0"]} and saved.layout["0"].first_chunk == 9


def test_hf_dequantizes_fp8_and_fp4_weights_as_the_reference_does(tiny_ckpt):
    # the session checkpoint: FP8 linears (128x128 ue8m0 scales), FP4 routed experts (per-32 scales), an MTP block
    model = hf.load_model(tiny_ckpt)
    assert hf_weights.compare(model, tiny_ckpt) == []
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[0, 4, 2] += 1  # an FP4 expert's w2, as HF holds it
        model.model.layers[0].self_attn.q_b_proj.weight[0, 0] += 1  # an FP8 linear
    assert [p.split(":")[0] for p in hf_weights.compare(model, tiny_ckpt)] == [
        "layers.0.attn.wq_b.weight",
        "layers.1.ffn.experts.0.w2.weight",
    ]

"""V4-Flash-Base checkpoints: routed experts in FP8 e4m3 with 128x128 ue8m0 block scales (`expert_dtype = "fp8"`),
written, detected from what the shards hold, loaded, and run bitwise by both models."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from parity.cases import parse_case
from parity.checkpoint import Checkpoint, build_model, write_checkpoint
from parity.config import ModelArgs
from parity.errors import ParityError
from parity.run import run_case

EXPERT = "layers.2.ffn.experts.5.w1.weight"


@pytest.fixture(scope="module")
def fp8_args() -> ModelArgs:
    return ModelArgs.tiny(expert_dtype="fp8")


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory, fp8_args):
    return write_checkpoint(tmp_path_factory.mktemp("fp8_experts"), fp8_args, seed=3)


def _header(ckpt, name):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    with safe_open(str(ckpt / index["weight_map"][name]), "pt") as f:
        return f.get_slice(name).get_dtype(), f.get_slice(name).get_shape()


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.fixture
def copy(fp8_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(fp8_ckpt, dst)
    return dst


def test_config_accepts_fp8_and_refuses_others():
    args = ModelArgs.tiny(expert_dtype="fp8")
    assert args.routed_expert_dtype == torch.float8_e4m3fn and args.expert_format == "fp8"
    assert ModelArgs.tiny(expert_dtype=None).expert_format == "fp8"  # the official default Linear dtype
    assert ModelArgs.tiny(expert_dtype="fp4").expert_format == "fp4"
    with pytest.raises(ParityError, match=r"'expert_dtype'.*'fp4', 'fp8'.*'fp6'"):
        ModelArgs.tiny(expert_dtype="fp6")
    with pytest.raises(ParityError, match="'moe_inter_dim'.*multiple of 128"):
        ModelArgs.tiny(dtype="bf16", expert_dtype="fp8", moe_inter_dim=96)


def test_fp8_experts_on_disk(fp8_ckpt, fp8_args):
    # e4m3 [inter, dim] and one e8m0 scale per 128x128 block, like every FP8 linear (the V4-Flash-Base layout)
    assert _header(fp8_ckpt, EXPERT) == ("F8_E4M3", [fp8_args.moe_inter_dim, fp8_args.dim])
    scale = EXPERT.removesuffix("weight") + "scale"
    assert _header(fp8_ckpt, scale) == ("F8_E8M0", [fp8_args.moe_inter_dim // 128, fp8_args.dim // 128])
    root = json.loads((fp8_ckpt / "config.json").read_text())
    assert root["expert_dtype"] == "fp8" and root["quantization_config"]["weight_block_size"] == [128, 128]
    assert Checkpoint(fp8_ckpt).args == fp8_args


def test_fp8_is_the_official_default_expert(fp8_ckpt):
    # "fp8" is what the official code runs when expert_dtype is absent: the same parameters, the same logits
    model, _ = build_model(fp8_ckpt)
    default, _ = build_model(fp8_ckpt, overrides={"expert_dtype": None})
    w = model.layers[2].ffn.experts[5].w1.weight
    assert w.dtype == torch.float8_e4m3fn
    with safe_open(
        str(fp8_ckpt / json.loads((fp8_ckpt / "model.safetensors.index.json").read_text())["weight_map"][EXPERT]), "pt"
    ) as f:  # noqa: E501
        assert torch.equal(w.view(torch.uint8), f.get_tensor(EXPERT).view(torch.uint8))
    tokens = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(tokens), default(tokens))


def test_stale_fp4_inference_config_is_detected(copy, fp8_args):
    # a Base checkpoint whose inference config still says "fp4" (the README's "delete the key" step not done) and
    # whose root config carries only quantization_config: the shards decide
    _edit_json(copy / "inference" / "config.json", expert_dtype="fp4")
    _edit_json(copy / "config.json", expert_dtype=...)
    assert ModelArgs.from_json(copy / "inference" / "config.json").expert_dtype == "fp4"  # what it says
    assert Checkpoint(copy).args.expert_dtype == "fp8"  # what it holds
    model, args = build_model(copy)
    assert args == fp8_args and model.layers[0].ffn.experts[0].w2.weight.dtype == torch.float8_e4m3fn


def test_fp4_without_root_key_stays_fp4(tiny_ckpt, tmp_path, tiny_args):
    # the initial Flash revision: no expert_dtype in the root config, FP4 experts on disk
    dst = tmp_path / "initial"
    shutil.copytree(tiny_ckpt, dst)
    _edit_json(dst / "config.json", expert_dtype=...)
    assert Checkpoint(dst).args == tiny_args
    _edit_json(dst / "inference" / "config.json", expert_dtype=None)  # a config that lost the key: bytes say FP4
    assert Checkpoint(dst).args.expert_dtype == "fp4"


def test_root_config_contradicting_the_shards_is_refused(copy):
    _edit_json(copy / "config.json", expert_dtype="fp4")
    with pytest.raises(ParityError, match=r"config\.json: expert_dtype 'fp4' but tensor 'layers\.0\.ffn.*F8_E4M3"):
        Checkpoint(copy)


def test_case_check_compares_what_the_experts_hold(fp8_ckpt):
    ckpt = Checkpoint(fp8_ckpt)
    ckpt.check_model(ModelArgs.tiny(expert_dtype=None), "case")  # the same model
    with pytest.raises(ParityError, match="expert_dtype='fp4'.*another model"):
        ckpt.check_model(ModelArgs.tiny(), "case")


def test_parity_run_on_fp8_experts_is_bitwise(fp8_ckpt, tmp_path):
    # decode-exact: the engine's FP8 expert path (ops.moe_experts, torch backend) against the reference, bitwise
    case = parse_case(
        {
            "name": "fp8-experts",
            "model": {"preset": "tiny", "seed": 3, "overrides": {"expert_dtype": "fp8"}},
            "requests": [{"prompt_len": 9, "decode_steps": 2}, {"prompt_len": 6, "decode_steps": 2}],
            "engine": {"chunk_size": 4, "token_budget": 8},
        },
        "test",
    )
    report = run_case(case, fp8_ckpt)
    assert report.passed and report.noise == "decode-exact", report.location
    assert any(r["site"] == "layers.2.ffn.output" and r["bitwise"] and r["compared"] for r in report.chained)


def test_a_wrong_fp8_expert_scale_is_caught(fp8_ckpt):
    # planted: the engine's FP8 routed experts read their w1 block scales with the e8m0 exponent off by one (bias
    # 126 for 127: every scale doubled); the verdict must fail at the first layer's MoE output
    def off_by_one(ops):
        inner = ops.moe_experts

        def moe_experts(x, weights, indices, experts, shared, *rest):
            doubled = lambda s: (s.float() * 2).to(torch.float8_e8m0fnu)  # noqa: E731
            bad = [replace(e, w1=(e.w1[0], doubled(e.w1[1]))) for e in experts]
            return inner(x, weights, indices, bad, shared, *rest)

        return replace(ops, moe_experts=moe_experts)

    case = parse_case(
        {
            "name": "fp8-experts-bug",
            "model": {"preset": "tiny", "seed": 3, "overrides": {"expert_dtype": "fp8"}},
            "requests": [{"prompt_len": 9, "decode_steps": 1}],
        },
        "test",
    )
    report = run_case(case, fp8_ckpt, transform_ops=off_by_one, golden="never")
    assert not report.passed
    assert report.location.startswith("layer 0 experts (layers.0.ffn.output:out)"), report.location

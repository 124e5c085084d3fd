"""Bad checkpoints: config.json with a wrong type, an unknown key, bad bytes; a missing shard; a NaN weight. Each
is one line naming the file and the key or tensor; a case that differs from a good checkpoint names the key and
says whether config.json sets it at all."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parity.checkpoint import Selection, build_model
from parity.errors import ParityError
from tests.badinput.conftest import assert_bad_input

SMALL_CASE = """name = "small"
[model]
preset = "tiny"
[[requests]]
prompt_len = 5
decode_steps = 1
"""


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt):
    return shutil.copytree(tiny_ckpt, tmp_path / "ckpt")


def _config(ckpt):
    return ckpt / "inference" / "config.json"


def _edit_config(ckpt, **changes) -> None:
    config = json.loads(_config(ckpt).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    _config(ckpt).write_text(json.dumps(config))


def _run(parity_cli, tmp_path, ckpt):
    case = tmp_path / "small.toml"
    case.write_text(SMALL_CASE)
    out = tmp_path / "out"
    r = parity_cli("run", case, "--checkpoint", ckpt, "--out", out)
    assert not (out / "parity.json").exists()
    return r


@pytest.mark.parametrize(
    ("changes", "culprits"),
    [
        pytest.param({"dim": "256"}, ("key 'dim'", "integer >= 1", "'256'"), id="dim-as-str"),
        pytest.param({"n_layers": 0}, ("key 'n_layers'", "got 0"), id="no-layers"),
        pytest.param({"rope_theta": -1}, ("key 'rope_theta'", "> 0", "-1"), id="negative-theta"),
        pytest.param({"score_func": "relu"}, ("key 'score_func'", "'relu'"), id="score-func"),
        pytest.param({"compress_ratios": "4"}, ("key 'compress_ratios'", "'4'"), id="ratios-as-str"),
        pytest.param({"hidden_size": 256}, ("unknown ModelArgs key(s) ['hidden_size']",), id="hf-key"),
    ],
)
def test_bad_config_json(parity_cli, tmp_path, ckpt, changes, culprits):
    _edit_config(ckpt, **changes)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), str(_config(ckpt)), *culprits)


def test_a_missing_config_key_is_named_not_blamed_on_its_default(parity_cli, tmp_path, ckpt):
    _edit_config(ckpt, dim=None)  # the official loader would silently take the default 4096
    line = assert_bad_input(_run(parity_cli, tmp_path, ckpt), "case 'small'", "dim=256", str(_config(ckpt)))
    assert "does not set it (default 4096)" in line


def test_a_good_checkpoint_of_another_model_names_the_key(parity_cli, tmp_path, ckpt):
    case = tmp_path / "wide.toml"
    case.write_text(SMALL_CASE.replace('preset = "tiny"', 'preset = "tiny"\noverrides = { n_heads = 8 }'))
    line = assert_bad_input(parity_cli("run", case, "--checkpoint", ckpt), "n_heads=8", "has 4", "another model")
    assert str(case) in line


@pytest.mark.parametrize(
    ("damage", "culprits"),
    [
        pytest.param(lambda c: _config(c).write_bytes(b"\xff"), ("config.json", "not UTF-8"), id="config-bytes"),
        pytest.param(lambda c: _config(c).write_text("[1, 2]"), ("config.json", "JSON object"), id="config-list"),
        pytest.param(lambda c: _config(c).unlink(), ("config.json", "no such config file"), id="no-config"),
        pytest.param(
            lambda c: (c / "model.safetensors.index.json").write_bytes(b"\xff"),
            ("model.safetensors.index.json", "not UTF-8"),
            id="index-bytes",
        ),
    ],
)  # fmt: skip
def test_damaged_checkpoint_files(parity_cli, tmp_path, ckpt, damage, culprits):
    damage(ckpt)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), str(ckpt), *culprits)


def _poison(ckpt, name: str, index: int | None = None) -> str:
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(shard)
    t = tensors[name]
    if index is None:
        tensors[name] = torch.full_like(t, float("nan"))
    else:
        t.view(-1)[index] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(shard)


def test_an_all_nan_embedding_is_refused_naming_the_tensor(ckpt):
    shard = _poison(ckpt, "embed.weight")
    with pytest.raises(ParityError, match="tensor 'embed.weight' holds 262144 NaN/Inf of 262144") as e:
        build_model(ckpt, Selection(layers=[], mtp=False))
    assert shard in str(e.value) and "\n" not in str(e.value)


def test_one_inf_in_a_norm_weight_is_refused(ckpt):
    _poison(ckpt, "layers.1.attn_norm.weight", index=3)
    with pytest.raises(ParityError, match="'layers.1.attn_norm.weight' holds 1 NaN/Inf"):
        build_model(ckpt, Selection(layers=[1], mtp=False, embed_head=False))


def test_an_index_entry_no_parameter_reads_is_refused(ckpt):
    """A tensor listed under a loaded layer that the model has no parameter for (another model's checkpoint, a
    misspelt name): refused as the official loader's strict load refuses it, not loaded silently."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["layers.1.attn.extra.weight"] = index["weight_map"]["layers.1.attn_norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ParityError, match="tensor 'layers.1.attn.extra.weight' is not a parameter of the model"):
        build_model(ckpt, Selection(layers=[1], mtp=False, embed_head=False))
    build_model(ckpt, Selection(layers=[0], mtp=False, embed_head=False))  # other layers are not read: no refusal


def test_a_streamed_build_refuses_an_index_entry_no_resident_parameter_reads(ckpt):
    """The streamed model reads its resident parts (embedding, final norm, head) outside `load_params`: the same
    refusal holds there."""
    from parity.stream import build_streamed

    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["head.extra"] = index["weight_map"]["head.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ParityError, match="tensor 'head.extra' is not a parameter of the model"):
        build_streamed(ckpt)


def test_the_clean_checkpoint_loads(ckpt):
    """The control: the unpoisoned copy loads the same selection."""
    build_model(ckpt, Selection(layers=[1], mtp=False))


def test_parity_run_refuses_a_nan_checkpoint_with_exit_2(parity_cli, tmp_path, ckpt):
    _poison(ckpt, "embed.weight")
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), "'embed.weight'", "NaN/Inf", "expected finite weights")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e8m0fnu, torch.float8_e5m2])
def test_every_fp8_byte_is_judged_as_torch_casts_it(dtype):
    """The byte-level NaN test of the FP8 weights agrees with torch's float cast on all 256 codes."""
    from parity.checkpoint.reader import _non_finite

    codes = torch.arange(256, dtype=torch.uint8).view(dtype)
    assert _non_finite(codes) == int((~torch.isfinite(codes.float())).sum()) > 0


def _shard_of(ckpt, name: str):
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def _retensor(ckpt, name: str, edit) -> str:
    shard = _shard_of(ckpt, name)
    tensors = load_file(shard)
    tensors[name] = edit(tensors[name])
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(shard)


@pytest.mark.parametrize(
    ("changes", "culprits"),
    [
        pytest.param({"dim": -256}, ("key 'dim'", "integer >= 1", "-256"), id="negative-dim"),
        pytest.param({"n_heads": 0}, ("key 'n_heads'", "got 0"), id="zero-heads"),
        pytest.param({"dim": 256.0}, ("key 'dim'", "256.0"), id="float-dim"),
        pytest.param({"n_layers": 2.5}, ("key 'n_layers'", "2.5"), id="fractional-layers"),
        pytest.param({"vocab_size": -5}, ("key 'vocab_size'", "-5"), id="negative-vocab"),
        pytest.param({"vocab_size": 2**40}, ("key 'vocab_size'", "<= 2147483647"), id="huge-vocab"),
        pytest.param({"norm_eps": 0}, ("key 'norm_eps'", "> 0"), id="zero-eps"),
        pytest.param({"n_routed_experts": True}, ("key 'n_routed_experts'", "True"), id="bool-count"),
        pytest.param({"compress_ratios": [0]}, ("compress_ratios", "needs 5 entries"), id="short-ratios"),
    ],
)
def test_config_sizes(parity_cli, tmp_path, ckpt, changes, culprits):
    _edit_config(ckpt, **changes)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), str(_config(ckpt)), *culprits)


def test_a_partially_written_shard(parity_cli, tmp_path, ckpt):
    shard = _shard_of(ckpt, "layers.0.attn_norm.weight")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), str(shard), "unreadable safetensors file")


def test_an_index_naming_a_missing_shard(parity_cli, tmp_path, ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["layers.0.attn_norm.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    line = assert_bad_input(_run(parity_cli, tmp_path, ckpt), "model-00099-of-00099.safetensors", "missing")
    assert "model.safetensors.index.json" in line


@pytest.mark.parametrize(
    ("edit", "found"),
    [
        pytest.param(lambda t: t.float(), "[256] F32", id="dtype"),
        pytest.param(lambda t: t[:10].clone(), "[10] BF16", id="shape"),
    ],
)
def test_a_tensor_of_the_wrong_dtype_or_shape(parity_cli, tmp_path, ckpt, edit, found):
    shard = _retensor(ckpt, "layers.0.attn_norm.weight", edit)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), shard, "'layers.0.attn_norm.weight'", found, "expected [256]")


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        pytest.param("{", ("not a readable JSON config",), id="cut"),
        pytest.param("[1]", ("expected a JSON object", "list"), id="a-list"),
        pytest.param('{"expert_dtype": "int3"}', ("key 'expert_dtype'", "'int3'"), id="expert-dtype"),
    ],
)
def test_a_damaged_root_config(parity_cli, tmp_path, ckpt, text, culprits):
    """The HF root config.json is read for its expert format: damaged, it is refused, not silently ignored."""
    (ckpt / "config.json").write_text(text)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), str(ckpt / "config.json"), *culprits)


def test_a_root_config_is_optional(parity_cli, tmp_path, ckpt):
    """The control: the official code never reads it, so a checkpoint without one loads."""
    (ckpt / "config.json").unlink()
    build_model(ckpt, Selection(layers=[0], mtp=False, embed_head=False))


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        pytest.param("{}", "no 'weight_map' object", id="no-map"),
        pytest.param('{"weight_map": []}', "no 'weight_map' object", id="map-list"),
        pytest.param('{"weight_map": {"a', "not valid JSON", id="cut"),
    ],
)
def test_a_damaged_index(parity_cli, tmp_path, ckpt, text, culprit):
    (ckpt / "model.safetensors.index.json").write_text(text)
    assert_bad_input(_run(parity_cli, tmp_path, ckpt), "model.safetensors.index.json", culprit)

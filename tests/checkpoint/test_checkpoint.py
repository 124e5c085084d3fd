"""Synthetic official-format checkpoints: on-disk format, write -> read round trip, lazy partial loads, errors."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from parity.checkpoint import Checkpoint, Selection, build_model
from parity.checkpoint.layout import INDEX_FILE, shard_file
from parity.checkpoint.synth import synth_tensors
from parity.config import ModelArgs
from parity.errors import ParityError
from parity.formats import dequantize_fp8_blocks
from parity.reference.model import default_dtype


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _read_all(path):
    index = json.loads((path / INDEX_FILE).read_text())
    out = {}
    for name, file in index["weight_map"].items():
        with safe_open(str(path / file), framework="pt") as f:
            out[name] = f.get_tensor(name)
    return index, out


def test_round_trip_bitwise(tiny_ckpt, tiny_args):
    _, on_disk = _read_all(tiny_ckpt)
    generated = dict(synth_tensors(tiny_args, seed=0))
    assert on_disk.keys() == generated.keys()
    for name, t in generated.items():
        assert on_disk[name].dtype == t.dtype, name
        assert torch.equal(_bits(on_disk[name]), _bits(t)), name


def test_official_disk_format(tiny_ckpt, tiny_args):
    index, t = _read_all(tiny_ckpt)
    a = tiny_args
    # FP8 linear: e4m3 + ue8m0 scale per 128x128 block
    assert t["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert t["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert t["layers.1.attn.wq_b.scale"].shape == (a.n_heads * a.head_dim // 128, a.q_lora_rank // 128)
    # wo_a stays FP8 on disk (convert.py dequantizes it)
    assert t["layers.1.attn.wo_a.weight"].dtype == torch.float8_e4m3fn and "layers.1.attn.wo_a.scale" in t
    # FP4 routed experts: packed int8 [I, D/2] + per-32 scales
    assert t["layers.2.ffn.experts.5.w1.weight"].dtype == torch.int8
    assert t["layers.2.ffn.experts.5.w1.weight"].shape == (a.moe_inter_dim, a.dim // 2)
    assert t["layers.2.ffn.experts.5.w1.scale"].shape == (a.moe_inter_dim, a.dim // 32)
    # shared expert FP8, hash table int64 with distinct experts per token
    assert t["layers.0.ffn.shared_experts.w2.weight"].dtype == torch.float8_e4m3fn
    tid2eid = t["layers.0.ffn.gate.tid2eid"]
    assert tid2eid.dtype == torch.int64 and tid2eid.shape == (a.vocab_size, a.n_activated_experts)
    assert all(len(set(row.tolist())) == a.n_activated_experts for row in tid2eid)
    assert "layers.0.ffn.gate.bias" not in t and t["layers.2.ffn.gate.bias"].dtype == torch.float32
    # bf16 norms / head / compressor projections, fp32 mHC and sinks
    for name in ("layers.1.attn_norm.weight", "head.weight", "layers.1.attn.compressor.wkv.weight", "norm.weight"):
        assert t[name].dtype == torch.bfloat16, name
    for name in ("layers.1.hc_attn_fn", "layers.1.attn.attn_sink", "layers.1.attn.compressor.ape", "hc_head_fn"):
        assert t[name].dtype == torch.float32, name
    assert t["layers.1.attn.compressor.ape"].shape == (4, 2 * a.head_dim)
    assert t["layers.2.attn.compressor.ape"].shape == (128, a.head_dim)
    # no mtp embed/head on disk; mtp extras present
    assert not any(k.startswith(("mtp.0.embed", "mtp.0.head")) for k in t)
    assert t["mtp.0.e_proj.weight"].dtype == torch.float8_e4m3fn and t["mtp.0.hc_head_scale"].shape == (1,)
    # shard layout and index
    n = a.n_layers + 3
    wm = index["weight_map"]
    assert wm["embed.weight"] == shard_file(1, n)
    assert wm["layers.2.attn.wq_a.weight"] == shard_file(4, n)
    assert wm["head.weight"] == wm["norm.weight"] == wm["hc_head_fn"] == shard_file(a.n_layers + 2, n)
    assert wm["mtp.0.e_proj.weight"] == shard_file(n, n)
    assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in t.values())
    assert ModelArgs.from_json(tiny_ckpt / "inference" / "config.json") == a
    root = json.loads((tiny_ckpt / "config.json").read_text())
    assert root["quantization_config"]["weight_block_size"] == [128, 128] and root["hidden_size"] == a.dim


def test_load_converts_like_the_official_convert(tiny_ckpt, make_model):
    _, t = _read_all(tiny_ckpt)
    model = make_model()
    sd = model.state_dict()
    wo_a = dequantize_fp8_blocks(t["layers.1.attn.wo_a.weight"], t["layers.1.attn.wo_a.scale"]).to(torch.bfloat16)
    assert torch.equal(sd["layers.1.attn.wo_a.weight"], wo_a)
    assert torch.equal(_bits(sd["layers.3.ffn.experts.2.w3.weight"]), _bits(t["layers.3.ffn.experts.2.w3.weight"]))
    assert sd["layers.3.ffn.experts.2.w3.weight"].dtype == torch.float4_e2m1fn_x2
    assert torch.equal(sd["layers.0.ffn.gate.tid2eid"], t["layers.0.ffn.gate.tid2eid"].int())
    assert torch.equal(sd["head.weight"], t["head.weight"].float())
    assert torch.equal(_bits(sd["layers.1.attn.wq_a.scale"]), _bits(t["layers.1.attn.wq_a.scale"]))


def test_lazy_load_materializes_only_the_selection(tiny_ckpt, make_model):
    full = make_model().state_dict()
    part, _ = build_model(tiny_ckpt, Selection(layers=[2], mtp=False, embed_head=False))
    params = dict(part.named_parameters())
    loaded = {k for k, p in params.items() if not p.is_meta}
    assert loaded == {k for k in params if k.startswith("layers.2.")}
    for k in loaded:
        assert torch.equal(_bits(params[k].data), _bits(full[k])), k
    loaded_bytes = sum(params[k].numel() * params[k].element_size() for k in loaded)
    total_bytes = sum(p.numel() * p.element_size() for p in full.values())
    assert loaded_bytes < total_bytes / 4
    # the selected layer runs on its own, on streams from the full model
    ids = torch.randint(0, 1024, (1, 30))
    model = make_model()
    streams = {}
    model.layers[1].register_forward_hook(lambda m, i, o: streams.setdefault("in", o.clone()))
    model.layers[2].register_forward_hook(lambda m, i, o: streams.setdefault("out", o.clone()))
    model(ids, 0)
    with torch.inference_mode(), default_dtype(torch.bfloat16):
        assert torch.equal(part.layers[2](streams["in"], 0, ids), streams["out"])


def test_unknown_layer_selection(tiny_ckpt):
    with pytest.raises(ParityError, match="layer 9 does not exist"):
        build_model(tiny_ckpt, Selection(layers=[9]))


@pytest.fixture
def broken_ckpt(tiny_ckpt, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, path)
    return path


def test_missing_index(broken_ckpt):
    (broken_ckpt / INDEX_FILE).unlink()
    with pytest.raises(ParityError, match=r"model\.safetensors\.index\.json: missing"):
        Checkpoint(broken_ckpt)


def test_missing_tensor_is_named(broken_ckpt):
    index = json.loads((broken_ckpt / INDEX_FILE).read_text())
    del index["weight_map"]["layers.2.attn.wkv.scale"]
    (broken_ckpt / INDEX_FILE).write_text(json.dumps(index))
    expected = r"'layers\.2\.attn\.wkv\.scale' is missing .*expected shape \[1, 2\] F8_E8M0"
    with pytest.raises(ParityError, match=expected):
        build_model(broken_ckpt)


def test_wrong_shape_is_named(broken_ckpt):
    shard = broken_ckpt / shard_file(4, 7)  # layer 2
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.2.attn.attn_sink"] = torch.zeros(5)
    save_file(tensors, str(shard))
    with pytest.raises(ParityError, match=r"'layers\.2\.attn\.attn_sink' is \[5\] F32, expected \[4\] F32"):
        build_model(broken_ckpt)


def test_truncated_shard(broken_ckpt):
    shard = broken_ckpt / shard_file(3, 7)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParityError, match=r"model-00003-of-00007\.safetensors"):
        build_model(broken_ckpt)

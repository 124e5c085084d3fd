"""`[model] layers = [...]`: a model made of some layers of a checkpoint (`parity.checkpoint.subset`), read through a
small index over the same shards; it computes exactly what those blocks of the full model compute in sequence."""

import json
import re

import torch
from torch import nn

from parity.cases import parse_case
from parity.checkpoint import build_model
from parity.checkpoint.subset import STORED_NAMES, subset_args, write_subset
from parity.config import ModelArgs
from parity.run import prepare_checkpoint, run_case
from parity.stream import build_streamed

LAYERS = (0, 2, 3)  # SWA + hash routing, HCA, CSA with indexer (tiny: ratios 0, 4, 128, 4; hash layers 0, 1)


def test_subset_config_keeps_each_layer_what_it_is():
    sub = subset_args(ModelArgs.tiny(), LAYERS)
    assert (sub.n_layers, sub.n_hash_layers, sub.compress_ratios) == (3, 1, (0, 128, 4, 0))


def _blocks_of_full(ckpt, layers):
    full, _ = build_model(ckpt)
    full.layers = nn.ModuleList([full.layers[i] for i in layers])  # each block keeps its own id, ratio, routing
    return full


def test_subset_computes_the_full_models_blocks(tiny_ckpt, tiny_args, tmp_path):
    sub_dir = write_subset(tiny_ckpt, LAYERS, tmp_path / "sub", tiny_args)
    assert not list(sub_dir.glob("*.safetensors"))  # an index over the original shards: nothing copied
    want = _blocks_of_full(tiny_ckpt, LAYERS)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    expected = want(tokens)
    for build in (build_model, build_streamed):
        model, args = build(sub_dir)
        assert args == subset_args(tiny_args, LAYERS)
        assert torch.equal(model(tokens), expected)


def test_a_subset_reading_the_wrong_layer_is_caught(tiny_ckpt, tiny_args, tmp_path):
    # planted: the rename shifts the expert index of the subset's layer 1 (expert e reads the stored expert e+1)
    sub_dir = write_subset(tiny_ckpt, LAYERS, tmp_path / "sub", tiny_args)
    index_path = sub_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shift = lambda m: f"experts.{(int(m.group(1)) + 1) % tiny_args.n_routed_experts}."  # noqa: E731
    for k, v in index[STORED_NAMES].items():
        if k.startswith("layers.1.ffn.experts."):
            index[STORED_NAMES][k] = re.sub(r"experts\.(\d+)\.", shift, v)
    index_path.write_text(json.dumps(index))
    tokens = torch.arange(12)[None]
    model, _ = build_model(sub_dir)
    assert not torch.equal(model(tokens), _blocks_of_full(tiny_ckpt, LAYERS)(tokens))


def test_parity_run_on_a_layer_subset(tiny_ckpt, tmp_path):
    case = parse_case(
        {
            "name": "subset",
            "model": {"preset": "tiny", "layers": [1, 3]},
            "requests": [{"prompt_len": 9, "decode_steps": 1}],
            "engine": {"chunk_size": 4, "token_budget": 8},
        },
        "test",
    )
    ckpt = prepare_checkpoint(case, tiny_ckpt, tmp_path)
    report = run_case(case, ckpt)
    assert report.passed, report.location
    assert {r["site"].split(".")[1] for r in report.chained if r["site"].startswith("layers.")} == {"0", "1"}

"""install(): zero hooks when off; with it on, records hold bitwise what each module returned, with their tags."""

import json
import os
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from parity import dump
from parity.compare import load_dump
from parity.errors import ParityError
from tests.dump.toymodel import N_LAYERS, ToyLM, prompts, run


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _global_hook_count() -> int:
    from torch.nn.modules import module

    return len(module._global_forward_hooks) + len(module._global_forward_pre_hooks)


@pytest.mark.parametrize(
    "config",
    [pytest.param(None, id="env-unset"), pytest.param(dump.DumpConfig(), id="explicit-off")],
)
def test_disabled_registers_zero_hooks(monkeypatch, config):
    for var in [v for v in os.environ if v.startswith("PARITY_DUMP")]:
        monkeypatch.delenv(var)
    model = ToyLM()
    before = _global_hook_count()
    handle = dump.install(model, config)
    assert not handle.enabled and handle.hooks == [] and handle.dir is None
    assert _hook_count(model) == 0 and _global_hook_count() == before


def test_env_enables_and_remove_takes_hooks_off(monkeypatch, tmp_path):
    monkeypatch.setenv("PARITY_DUMP_DIR", str(tmp_path))
    monkeypatch.setenv("PARITY_DUMP_WHAT", "both")
    model = ToyLM()
    with dump.install(model) as handle:
        assert [s.path for s in handle.sites] == [f"layers.{i}" for i in range(N_LAYERS)]
        assert _hook_count(model) == 2 * N_LAYERS
    assert _hook_count(model) == 0


class _Inplace(nn.Module):
    """Returns a tensor, then its parent edits it in place, as fused kernels do with their buffers."""

    def forward(self, x):
        return x * 2


class _Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Inplace(), _Inplace()])
        self.returned: list[torch.Tensor] = []

    def forward(self, x):
        for layer in self.layers:
            y = layer(x)
            self.returned.append(y.clone())
            y.add_(1000)  # clobbers the buffer the hook saw
            x = y
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dumped_tensors_are_bitwise_what_the_module_returned(tmp_path, dtype):
    torch.manual_seed(0)
    model = _Parent()
    with dump.install(model, dump.DumpConfig(dir=tmp_path)):
        with dump.phase("prefill"):
            model(torch.randn(5, 13, dtype=dtype))
    d = load_dump(tmp_path)
    assert [r.name for r in d.records] == ["layers.0:out", "layers.1:out"]
    for record, returned in zip(d.records, model.returned, strict=True):
        t = d.load(record)
        assert t.dtype == dtype and torch.equal(t.view(torch.uint8), returned.view(torch.uint8))


def test_toy_run_tensors_bitwise_and_tags(tmp_path):
    """Every dumped block output equals the module's real output, and carries phase, step, layer, layout."""
    tokens, decode = prompts(batch=2, seq=5, decode_steps=2)
    model = ToyLM()
    seen: dict[tuple, torch.Tensor] = {}

    def spy(i):
        def hook(module, args, out):
            tags = dump.current_tags()
            seen[(f"layers.{i}", tags.phase, tags.step)] = out[0].clone()

        return hook

    spies = [layer.register_forward_hook(spy(i)) for i, layer in enumerate(model.layers)]
    run(model, tokens, decode, dump.DumpConfig(dir=tmp_path), requests=["x", "y"])
    for h in spies:
        h.remove()
    d = load_dump(tmp_path)
    hidden = [r for r in d.records if r.field == "out.0"]
    assert len(hidden) == N_LAYERS * 3
    for r in hidden:
        assert torch.equal(d.load(r), seen[(r.module, r.phase, r.step)])
        assert r.layer == int(r.module.split(".")[1]) and r.block == r.module and r.cls == "ToyBlock"
        assert (r.batch, r.requests, r.extra, r.io) == (2, ("x", "y"), {"impl": "ToyLM"}, "output")
        assert r.call == r.step and r.call_in_step == 0 and (r.rank, r.world_size) == (0, 1)
    assert [r.phase for r in hidden[:N_LAYERS]] == ["prefill"] * N_LAYERS
    assert {r.field for r in d.records} == {"out.0", "out.1"}


@dataclass
class _State:
    hidden: torch.Tensor
    scale: float
    _private: torch.Tensor


_Pair = namedtuple("_Pair", ["k", "v"])


class _HC:
    """A plain state object (like a hyper-connection state): its public tensor attributes are dumped."""

    def __init__(self, x):
        self.x_prev = x
        self.count = 3


class _Nested(nn.Module):
    def forward(self, x, *, positions=None):
        return (
            x.to(torch.float8_e4m3fn),
            {"scale": torch.ones(3, dtype=torch.float8_e8m0fnu), "idx": torch.arange(4)},
            _State(x + 1, 2.0, x),
            _Pair(x[:1], x[1:]),
            _HC(x * 3),
            None,
        )


class _Wrap(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Nested()])

    def forward(self, x):
        return self.layers[0](x, positions=torch.arange(x.shape[0]))


def test_nested_outputs_and_inputs_flatten_with_stable_names_and_dtypes(tmp_path):
    model = _Wrap()
    with dump.install(model, dump.DumpConfig(dir=tmp_path, what="both")):
        model(torch.randn(3, 5))
    d = load_dump(tmp_path)
    by_field = {r.field: r for r in d.records}
    assert list(by_field) == [
        "in.0",
        "in.positions",
        "out.0",
        "out.1.scale",
        "out.1.idx",
        "out.2.hidden",
        "out.3.k",
        "out.3.v",
        "out.4.x_prev",
    ]
    assert by_field["in.0"].io == "input" and by_field["out.0"].io == "output"
    assert by_field["in.0"].call == by_field["out.0"].call == 0
    dtypes = {f: d.load(r).dtype for f, r in by_field.items()}
    assert dtypes["out.0"] == torch.float8_e4m3fn and dtypes["out.1.scale"] == torch.float8_e8m0fnu
    assert dtypes["out.1.idx"] == torch.int64


def test_selection_by_class_regex_and_layers(tmp_path):
    model = ToyLM()
    sites = lambda **kw: [s.path for s in dump.install(model, dump.DumpConfig(dir=tmp_path, **kw)).sites]
    assert sites(classes="ToyFFN", layers="1-2") == ["layers.1.ffn", "layers.2.ffn"]
    assert sites(modules=r"^(embed|head)$") == ["embed", "head"]
    assert sites(modules=r"attn\.w", layers="4") == ["layers.4.attn.wv", "layers.4.attn.wo"]
    with pytest.raises(ParityError, match="no module of ToyLM matches"):
        dump.install(model, dump.DumpConfig(dir=tmp_path, classes="Attention"))


def test_layer_of_nearest_enclosing_index():
    pattern = dump.DumpConfig().layer_pattern
    assert dump.layer_of("model.layers.12.mlp.experts.3", pattern) == (12, "model.layers.12")
    assert dump.layer_of("transformer.h.0.attn", pattern) == (0, "transformer.h.0")
    assert dump.layer_of("mtp.1.layers.0.ffn", pattern) == (0, "mtp.1.layers.0")
    assert dump.layer_of("players.3", pattern) == (None, None)
    assert dump.layer_of("layers.3x", pattern) == (None, None)


def test_call_filter_phase_filter_and_call_in_step(tmp_path):
    tokens, decode = prompts(batch=1, seq=4, decode_steps=3)
    config = dump.DumpConfig(dir=tmp_path, layers="0", calls="1-", phases="decode")
    run(ToyLM(), tokens, decode, config)
    d = load_dump(tmp_path)
    assert sorted({(r.phase, r.step, r.call) for r in d.records}) == [("decode", s, s) for s in (1, 2, 3)]


def test_require_phase_skips_untagged_warmup(tmp_path):
    model = ToyLM()
    with dump.install(model, dump.DumpConfig(dir=tmp_path, layers="0", require_phase=True)):
        model(torch.zeros(1, 3, dtype=torch.long))  # warmup, untagged
        with dump.phase("prefill"):
            model(torch.zeros(1, 3, dtype=torch.long))
    d = load_dump(tmp_path)
    assert {(r.phase, r.call, r.call_in_step) for r in d.records} == {("prefill", 1, 0)}


def test_stats_mode_writes_summaries_not_tensors(tmp_path):
    tokens, decode = prompts(batch=2, seq=3, decode_steps=1)
    run(ToyLM(), tokens, decode, dump.DumpConfig(dir=tmp_path, mode="stats"))
    d = load_dump(tmp_path)
    assert not (tmp_path / "tensors").exists() and all(r.file is None for r in d.records)
    s = d.records[0].stats
    assert set(s) == {"numel", "nan", "inf", "zeros", "min", "max", "mean", "std", "absmax", "l2"}
    assert s["numel"] == 2 * 3 * 24 and s["nan"] == 0 and s["min"] <= s["mean"] <= s["max"]


def test_weights_dump_per_layer_block(tmp_path):
    model = ToyLM()
    dump.install(model, dump.DumpConfig(dir=tmp_path, layers="1", weights=True)).remove()
    d = load_dump(tmp_path)
    weights = {r.name: r for r in d.records if r.kind == "weight"}
    assert set(weights) == {n for n, _ in model.named_parameters() if n.startswith("layers.1.")}
    r = weights["layers.1.attn.wv.weight"]
    assert (r.layer, r.block, r.module, r.field, r.cls) == (1, "layers.1", "layers.1.attn.wv", "weight", "Linear")
    assert torch.equal(d.load(r), model.layers[1].attn.wv.weight)


def test_second_install_shares_the_dump_and_its_order(tmp_path):
    """A drafter built after the model goes into the same dir, after a prefix keeps its names apart."""
    main, drafter = ToyLM(seed=0), ToyLM(seed=1)
    config = dump.DumpConfig(dir=tmp_path, layers="0")
    with dump.install(main, config), dump.install(drafter, config, prefix="mtp"):
        with dump.phase("mtp-draft", step=1):
            tok = torch.zeros(1, 2, dtype=torch.long)
            main(tok)
            drafter(tok)
    d = load_dump(tmp_path)
    assert [r.name for r in d.records] == [
        "layers.0:out.0",
        "layers.0:out.1",
        "mtp.layers.0:out.0",
        "mtp.layers.0:out.1",
    ]
    assert d.records[2].block == "mtp.layers.0" and d.records[2].seq > d.records[1].seq


def test_refuses_a_dir_holding_another_runs_dump(tmp_path):
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"run": "someone-else"}) + "\n")
    with pytest.raises(ParityError, match="another run"):
        dump.install(ToyLM(), dump.DumpConfig(dir=tmp_path))

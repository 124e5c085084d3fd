"""DumpConfig: env parsing, validation that names the variable, and module/call selection."""

import dataclasses
from pathlib import Path

import pytest

from parity.dump import DumpConfig, Ranges
from parity.dump.config import DEFAULT_LAYER_REGEX
from parity.errors import ParityError


def test_from_env_reads_every_variable(tmp_path):
    env = {
        "PARITY_DUMP_DIR": str(tmp_path),
        "PARITY_DUMP_LAYERS": "0-2,7",
        "PARITY_DUMP_MODULES": r"attn$",
        "PARITY_DUMP_CLASSES": "Attention, MoE",
        "PARITY_DUMP_CALLS": "1-",
        "PARITY_DUMP_PHASES": "decode,mtp-verify",
        "PARITY_DUMP_STEPS": "3",
        "PARITY_DUMP_WHAT": "both",
        "PARITY_DUMP_MODE": "stats",
        "PARITY_DUMP_WEIGHTS": "yes",
        "PARITY_DUMP_REQUIRE_PHASE": "1",
        "PARITY_DUMP_LAYER_REGEX": r"blk(\d+)",
    }
    c = DumpConfig.from_env(env)
    assert c.enabled and c.dir == tmp_path
    assert [i in c.layers for i in (0, 2, 3, 7, 8)] == [True, True, False, True, False]
    assert c.classes == {"Attention", "MoE"} and c.phases == {"decode", "mtp-verify"}
    assert 0 not in c.calls and 10**6 in c.calls and list(c.steps.spans) == [(3, 3)]
    assert (c.what, c.mode, c.weights, c.require_phase) == ("both", "stats", True, True)


def test_unset_env_is_off():
    c = DumpConfig.from_env({})
    assert not c.enabled and c.layers is None and c.what == "outputs" and c.mode == "full"
    assert not DumpConfig.from_env({"PARITY_DUMP_DIR": ""}).enabled


@pytest.mark.parametrize(
    ("var", "value"),
    [
        pytest.param("PARITY_DUMP_LAYERS", "3-x", id="layers-not-int"),
        pytest.param("PARITY_DUMP_LAYERS", "5-2", id="layers-empty-range"),
        pytest.param("PARITY_DUMP_CALLS", "-1", id="calls-negative"),
        pytest.param("PARITY_DUMP_STEPS", "1,,2", id="steps-blank-item"),
        pytest.param("PARITY_DUMP_MODULES", "layers.(", id="modules-bad-regex"),
        pytest.param("PARITY_DUMP_PHASES", "decode,warmup", id="phase-unknown"),
        pytest.param("PARITY_DUMP_WHAT", "output", id="what-typo"),
        pytest.param("PARITY_DUMP_MODE", "summary", id="mode-unknown"),
        pytest.param("PARITY_DUMP_WEIGHTS", "maybe", id="weights-not-bool"),
        pytest.param("PARITY_DUMP_REQUIRE_PHASE", "2", id="require-phase-not-bool"),
        pytest.param("PARITY_DUMP_LAYER_REGEX", r"layers\.\d+", id="layer-regex-no-group"),
    ],
)
def test_bad_value_names_the_variable(tmp_path, var, value):
    with pytest.raises(ParityError, match=var):
        DumpConfig.from_env({"PARITY_DUMP_DIR": str(tmp_path), var: value})


def test_explicit_config_accepts_convenient_spellings(tmp_path):
    c = DumpConfig(dir=str(tmp_path), layers=range(2, 5), classes=["Block"], steps="0-1", phases=["prefill"])
    assert c.layers == Ranges.of([2, 3, 4]) and c.classes == {"Block"} and 1 in c.steps and 2 not in c.steps
    with pytest.raises(ParityError, match="PARITY_DUMP_LAYERS"):
        DumpConfig(dir=tmp_path, layers=["a"])


@pytest.mark.parametrize(
    ("kwargs", "path", "cls", "layer", "block", "expected"),
    [
        pytest.param({}, "layers.3", "Block", 3, "layers.3", True, id="default-selects-blocks"),
        pytest.param({}, "layers.3.attn", "Attn", 3, "layers.3", False, id="default-skips-submodules"),
        pytest.param({}, "embed", "Embedding", None, None, False, id="default-skips-non-layer"),
        pytest.param({"classes": "Attn"}, "layers.3.attn", "Attn", 3, "layers.3", True, id="class"),
        pytest.param({"modules": "head"}, "head", "Linear", None, None, True, id="regex-non-layer"),
        pytest.param({"modules": "attn", "classes": "X"}, "layers.3.attn", "Attn", 3, "layers.3", False, id="and"),
        pytest.param({"layers": "0-1"}, "layers.3", "Block", 3, "layers.3", False, id="layer-out-of-range"),
        pytest.param(
            {"layers": "0-1", "modules": ".*"}, "head", "Linear", None, None, False, id="layers-drop-non-layer"
        ),
    ],
)
def test_selects(tmp_path, kwargs, path, cls, layer, block, expected):
    assert DumpConfig(dir=tmp_path, **kwargs).selects(path, cls, layer, block) is expected


def test_wants_filters_calls_phases_steps(tmp_path):
    c = DumpConfig(dir=tmp_path, calls="1-2", phases="decode", steps="2-")
    assert c.wants(1, "decode", 2) and c.wants(2, "decode", 9)
    assert not c.wants(0, "decode", 2) and not c.wants(1, "prefill", 2) and not c.wants(1, "decode", 1)
    assert not c.wants(1, None, None)
    tagged_only = DumpConfig(dir=tmp_path, require_phase=True)
    assert tagged_only.wants(0, "prefill", 0) and not tagged_only.wants(0, None, None)
    assert DumpConfig(dir=tmp_path).wants(5, None, None)


def test_every_variable_is_documented_in_envs_md():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ENVS.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in doc.splitlines() if line.startswith("| `PARITY_")}
    variables = {f.metadata["env"] for f in dataclasses.fields(DumpConfig)}
    assert variables <= set(rows)
    # the documented default layer regex is the real one (table cells escape `|`)
    assert f"`{DEFAULT_LAYER_REGEX}`" in rows["PARITY_DUMP_LAYER_REGEX"].replace("\\|", "|")

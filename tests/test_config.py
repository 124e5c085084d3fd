"""ModelArgs overrides are explicit and validated: a misspelt key or a wrongly typed value is refused, naming it."""

import pytest

from parity.checkpoint import build_model
from parity.config import FIELD_NAMES, ModelArgs
from parity.errors import ParityError


def test_with_applies_known_fields(tiny_args):
    changed = tiny_args.with_({"revision": "initial", "rope_factor": 8, "compress_ratios": [0, 4, 128, 4, 0]})
    assert changed.revision == "initial" and changed.rope_factor == 8 and changed.compress_ratios == (0, 4, 128, 4, 0)
    assert tiny_args.with_((("max_batch_size", 2),)).max_batch_size == 2  # pairs, as a case stores them
    assert tiny_args.with_({}) == tiny_args
    assert tiny_args.with_(revision="initial").revision == "initial"


def test_misspelt_key_is_refused_with_the_valid_ones_listed(tiny_args):
    with pytest.raises(ParityError, match="'reset_state_on_prefil'"):
        tiny_args.with_(reset_state_on_prefil=True)
    with pytest.raises(ParityError) as err:
        tiny_args.with_({"reset_state_on_prefil": True})
    message = str(err.value)
    assert "\n" not in message and "'reset_state_on_prefil'" in message
    assert "valid keys: " + ", ".join(FIELD_NAMES) in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("revision", "latest", "one of ['initial', 'current']"),
        ("max_batch_size", "4", "an integer"),
        ("max_batch_size", True, "an integer"),
        ("rope_factor", "16", "a finite number"),
        ("reset_state_on_prefill", 1, "true or false"),
        ("compress_ratios", [0, 4.0], "a list of integers"),
        ("scale_fmt", "e8m0", "one of [None, 'ue8m0']"),
    ],
)
def test_wrongly_typed_value_is_refused(tiny_args, key, value, expected):
    with pytest.raises(ParityError, match=f"key '{key}': expected {expected}".replace("[", r"\[")):
        tiny_args.with_({key: value})


def test_presets_and_dicts_are_validated_the_same_way():
    with pytest.raises(ParityError, match=r"ModelArgs.tiny: unknown ModelArgs key\(s\) \['n_layer'\]"):
        ModelArgs.tiny(n_layer=2)
    with pytest.raises(ParityError, match="config.json: key 'dim': expected an integer"):
        ModelArgs.from_dict({"dim": 4096.0}, source="config.json")
    assert ModelArgs.tiny(n_layers=3, compress_ratios=(0, 4, 128, 0)).n_layers == 3


def test_build_model_refuses_a_misspelt_override(tiny_ckpt):
    with pytest.raises(ParityError, match=r"build_model\(.*\) overrides: unknown ModelArgs key\(s\) \['revison'\]"):
        build_model(tiny_ckpt, overrides={"revison": "initial"})
    with pytest.raises(TypeError):  # a keyword that is not build_model's is no longer taken for a ModelArgs field
        build_model(tiny_ckpt, revision="initial")

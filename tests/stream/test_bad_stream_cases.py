"""Bad `[model] checkpoint` / `stream` / `layers` keys and a bad `expert_dtype`: each refused by `parity run` with one
line naming the file and the key (expected vs found), before any checkpoint or report is written."""

import pytest

from tests.badinput.conftest import assert_bad_input
from tests.commands.conftest import parity_cli  # noqa: F401  (fixture)

CASE = """name = "bad"
[model]
{model}
[[requests]]
prompt_len = 5
decode_steps = 2
"""


@pytest.mark.parametrize(
    ("model", "culprits"),
    [
        pytest.param('preset = "tiny"\nstream = "yes"', ("model.stream must be true or false", "'yes'"),
                     id="stream-str"),
        pytest.param("checkpoint = 3", ("model.checkpoint must be a directory name", "3"), id="ckpt-int"),
        pytest.param('checkpoint = "nowhere"', ("model.checkpoint", "nowhere", "does not exist"), id="ckpt-missing"),
        pytest.param('checkpoint = "CKPT"\npreset = "tiny"', ("model.checkpoint and model.preset are exclusive",),
                     id="both"),
        pytest.param('preset = "tiny"\noverrides = { expert_dtype = "fp6" }', ("'expert_dtype'", "'fp8'", "'fp6'"),
                     id="fp6"),
        pytest.param('preset = "tiny"\nlayers = 2', ("model.layers must be a non-empty list", "2"), id="layers-int"),
        pytest.param('preset = "tiny"\nlayers = []', ("non-empty list", "[]"), id="layers-empty"),
        pytest.param('preset = "tiny"\nlayers = [2, 1]', ("must be ascending", "[2, 1]"), id="layers-order"),
        pytest.param('checkpoint = "CKPT"\nlayers = [0, 4]', ("model.layers: layer 4 does not exist", "0..3"),
                     id="layers-range"),
        pytest.param('checkpoint = "CKPT"\noverrides = { bogus = 1 }',
                     ("[model]", "unknown ModelArgs key(s) ['bogus']"), id="ckpt-override"),
    ],
)  # fmt: skip
def test_bad_stream_case(parity_cli, tmp_path, tiny_ckpt, model, culprits):  # noqa: F811
    out = tmp_path / "out"
    case = tmp_path / "case.toml"
    case.write_text(CASE.format(model=model.replace("CKPT", str(tiny_ckpt))))
    assert_bad_input(parity_cli("run", case, "--stream", "--out", out), str(case), *culprits)
    assert not out.exists()


def test_an_empty_checkpoint_dir_is_named(parity_cli, tmp_path):  # noqa: F811
    (tmp_path / "empty").mkdir()
    case = tmp_path / "case.toml"
    case.write_text(CASE.format(model='checkpoint = "empty"'))
    assert_bad_input(parity_cli("run", case), str(case), "model.checkpoint", "model.safetensors.index.json: missing")

"""Calibration files and gate baselines: a NaN, a string or a missing field is one line naming the field, never a
silently disabled gate."""

import json

import pytest

from parity.compare.thresholds import NoiseModel
from parity.errors import ParityError
from parity.gate import load_baseline


def _noise(tmp_path, **fields):
    data = {"schema": 1, "provenance": {}, "errors": {"layers.*.attn.output|out|chunk": 0.01}, "flips": {}}
    data.update(fields)
    path = tmp_path / "noise.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("fields", "culprit"),
    [
        ({"errors": {"layers.*.attn.output|out|chunk": float("nan")}}, "errors['layers.*.attn.output|out|chunk']"),
        ({"errors": {"layers.*.attn.output|out|chunk": "0.1"}}, "errors['layers.*.attn.output|out|chunk']"),
        ({"flips": {"layers.*.ffn.route|out.1|decode": -0.5}}, "flips['layers.*.ffn.route|out.1|decode']"),
        ({"margin": float("inf")}, "margin"),
        ({"golden_factor": 0.5}, "golden_factor"),
    ],
)
def test_bad_numbers_in_a_calibration_are_refused(tmp_path, fields, culprit):
    with pytest.raises(
        ParityError, match="field " + culprit.replace("[", r"\[").replace("*", r"\*").replace("|", r"\|")
    ):
        NoiseModel.load(_noise(tmp_path, **fields))


def test_a_good_calibration_loads(tmp_path):
    assert NoiseModel.load(_noise(tmp_path)).errors == {"layers.*.attn.output|out|chunk": 0.01}


@pytest.mark.parametrize(
    "cases",
    [
        [
            {
                "name": "tiny",
                "sites": [{"site": "layers.0.attn.output", "field": "out", "phase": "chunk", "max_err": "x"}],
            }
        ],
        [{"name": "tiny", "sites": [{"site": "layers.0.attn.output", "field": "out", "phase": "chunk"}]}],
        [{"sites": []}],
    ],
)
def test_bad_gate_baselines_are_refused(tmp_path, cases):
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"cases": cases}).replace('"x"', "NaN"))
    with pytest.raises(ParityError, match=r"--baseline .*cases\[0\]"):
        load_baseline(path)

"""Parity cases: every shipped case parses, bad cases are refused with a line naming the field."""

from pathlib import Path

import pytest

from parity.cases import BUILTIN_DIR, load_case, parse_case
from parity.errors import ParityError

CASES = sorted((Path(__file__).resolve().parent.parent / "cases").glob("*.toml")) + sorted(BUILTIN_DIR.glob("*.toml"))


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_shipped_cases_parse(path):
    case = load_case(str(path))
    assert case.requests and case.model_args().n_layers >= 1
    assert len(case.prompts(case.model_args().vocab_size)) == len(case.requests)


def test_builtin_default_is_tiny():
    assert load_case().name == "tiny" and load_case("tiny") == load_case(None)


BASE = {"name": "x", "model": {"preset": "tiny"}, "requests": [{"prompt_len": 5, "decode_steps": 1}]}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({"model": {"preset": "huge"}}, "unknown model preset 'huge'"),
        ({"model": {"preset": "tiny", "overrides": {"dim_x": 1}}}, "dim_x"),
        ({"requests": []}, "at least one"),
        ({"requests": [{"prompt_len": 600, "decode_steps": 1}]}, "max_seq_len=512"),
        ({"engine": {"mtp_draft": -1}}, "mtp_draft must be an integer >= 0"),
        ({"engine": {"decode_exact_chunks": "yes"}}, "true or false"),
        ({"engine": {"chunk": 3}}, r"unknown key\(s\) \['chunk'\] in \[engine\]"),
        ({"tolerance": {"min_cos": 0.9}}, r"unknown key\(s\) \['min_cos'\] in \[tolerance\]"),
        ({"tolerance": {"calibration": 3}}, "tolerance.calibration must be a file name"),
        ({"tolerance": {"calibration": "nope.json"}}, "tolerance.calibration: no such file"),
    ],
)
def test_bad_case_fields_are_named(patch, message):
    with pytest.raises(ParityError, match=message):
        parse_case({**BASE, **patch}, "case.toml")


def test_calibration_is_resolved_next_to_the_case_file(tmp_path):
    (tmp_path / "noise.json").write_text('{"schema": 1}')  # a valid (empty) noise model: the case reads it
    case = parse_case({**BASE, "tolerance": {"calibration": "noise.json"}}, str(tmp_path / "case.toml"))
    assert case.calibration == tmp_path / "noise.json"

"""Bad `parity gate` suites and baselines: unreadable or ill-typed suite files, case entries that do not load (named
with the suite), two cases whose report folders would overwrite each other, baselines with bad numbers or a case
listed twice, and outputs that cannot be written. Refused in one line before any case runs; --out is untouched."""

import json

import pytest

from tests.badinput.conftest import SMALL_CASE, assert_bad_input, tree


def _suite(tmp_path, text: str | bytes):
    path = tmp_path / "suite.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "small.toml").write_text(SMALL_CASE)
    (tmp_path / "other.toml").write_text(SMALL_CASE)  # a second file whose case is also named "small"
    return path


@pytest.mark.parametrize(
    ("text", "culprits"),
    [
        pytest.param(b'cases = ["\xff"]\n', ("not a readable TOML suite",), id="not-utf8"),
        pytest.param("cases = [\n", ("not a readable TOML suite",), id="cut"),
        pytest.param("cases = []\n", ("'cases' must be a non-empty list",), id="no-cases"),
        pytest.param('cases = "small.toml"\n', ("'cases' must be a non-empty list",), id="cases-str"),
        pytest.param("cases = [1]\n", ("'cases' must be a non-empty list",), id="cases-int"),
        pytest.param('cases = ["small.toml"]\ncolour = 1\n', ("unknown key(s) ['colour']",), id="unknown-key"),
        pytest.param('name = 5\ncases = ["small.toml"]\n', ("'name' must be a string",), id="name-int"),
        pytest.param('cases = ["nosuch"]\n', ("cases entry 'nosuch'", "unknown case 'nosuch'"), id="unknown-case"),
        pytest.param('cases = ["gone.toml"]\n', ("cases entry 'gone.toml'", "no such case file"), id="missing-file"),
        pytest.param(
            'cases = ["small.toml", "other.toml"]\n', ("'small.toml' and 'other.toml' are both named 'small'",),
            id="same-name",
        ),
        pytest.param(
            'cases = ["small.toml", "small.toml"]\n', ("'small.toml' and 'small.toml' are both named",), id="twice"
        ),
    ],
)  # fmt: skip
def test_bad_suites(parity_cli, tmp_path, text, culprits):
    suite = _suite(tmp_path, text)
    out = tmp_path / "out"
    assert_bad_input(parity_cli("gate", suite, "--out", out), str(suite), *culprits)
    assert not out.exists()


def test_a_bad_case_in_a_suite_names_both_files(parity_cli, tmp_path):
    suite = _suite(tmp_path, 'cases = ["bad.toml"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_CASE.replace("decode_steps = 1", "decode_steps = -1"))
    assert_bad_input(parity_cli("gate", suite, "--out", tmp_path / "out"), str(suite), str(bad), "decode_steps")


@pytest.mark.parametrize(
    ("baseline", "culprits"),
    [
        pytest.param('{"cases": [', ("not a readable gate.json",), id="cut"),
        pytest.param("[]", ("expected a gate.json with a 'cases' list",), id="a-list"),
        pytest.param('{"cases": [{"name": "small", "sites": "x"}]}', ("cases[0]",), id="sites-str"),
        pytest.param(
            '{"cases": [{"name": "small", "sites": [{"site": "a", "field": "o", "phase": "mtp", "max_err": -1}]}]}',
            ("cases[0].sites[0]", "max_err >= 0"), id="negative-error",
        ),
        pytest.param(
            '{"cases": [{"name": "small", "sites": [{"site": "a", "field": "o", "phase": "mtp", "max_err": NaN}]}]}',
            ("cases[0].sites[0]", "not NaN"), id="nan-error",
        ),
        pytest.param(
            '{"cases": [{"name": "small", "sites": []}, {"name": "small", "sites": []}]}',
            ("cases[1]", "'small' is listed twice"), id="case-twice",
        ),
    ],
)  # fmt: skip
def test_bad_baselines(parity_cli, tmp_path, baseline, culprits):
    suite = _suite(tmp_path, 'cases = ["small.toml"]\n')
    path = tmp_path / "gate.json"
    path.write_text(baseline)
    out = tmp_path / "out"
    assert_bad_input(parity_cli("gate", suite, "--out", out, "--baseline", path), f"--baseline {path}", *culprits)
    assert not out.exists()


def test_an_existing_out_is_left_as_it_was(parity_cli, tmp_path):
    suite = _suite(tmp_path, 'cases = ["small.toml", "other.toml"]\n')
    out = tmp_path / "out"
    (out / "small").mkdir(parents=True)
    (out / "gate.json").write_text(json.dumps({"suite": "old"}))
    before = tree(out)
    assert_bad_input(parity_cli("gate", suite, "--out", out), "both named 'small'")
    assert tree(out) == before

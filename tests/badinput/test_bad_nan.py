"""NaN/Inf semantics: never equal to anything unless both sides hold them at the same positions, and never in the
reference. Planted in copies of the toy dumps, then through `compare` and `bisect`."""

import dataclasses
import json
import math

import pytest
import torch

from parity.compare import TensorMetrics, Thresholds, judge
from parity.compare.gate import same_non_finite_positions
from tests.badinput.conftest import assert_bad_input, copy_dump, edit_tensor, manifest

NAN, INF = math.nan, math.inf


def _poison(d, n: int, edit) -> dict:
    line = manifest(d)[n]
    edit_tensor(d, line, edit)
    return line


def _fill(value):
    return lambda t: torch.full_like(t, value)


def _at(index: int, value):
    def edit(t):
        t.view(-1)[index] = value
        return t

    return edit


def _rows(r) -> dict[str, dict]:
    return {row["name"] + "@" + row["phase"] + str(row["step"]): row for row in json.loads(r.out)["rows"]}


def test_a_record_all_nan_on_both_sides_fails_compare_and_bisect(parity_cli, ref, tmp_path):
    a, b = copy_dump(ref, tmp_path / "a"), copy_dump(ref, tmp_path / "b")
    line = _poison(a, 4, _fill(NAN))
    _poison(b, 4, _fill(NAN))
    r = parity_cli("compare", a, b, "--json")
    bad = [row for row in json.loads(r.out)["rows"] if row["status"] == "fail"]
    assert r.code == 1 and [row["name"] for row in bad] == [line["name"]]
    assert "the reference itself produced NaN" in bad[0]["reasons"]
    r = parity_cli("bisect", a, b, "--json")
    first = json.loads(r.out)["summary"]["first"]
    assert r.code == 1 and first["name"] == line["name"] and first["step"] == line["step"]


def test_every_activation_nan_on_both_sides_fails(parity_cli, ref, tmp_path):
    a, b = copy_dump(ref, tmp_path / "a"), copy_dump(ref, tmp_path / "b")
    for d in (a, b):
        for n in range(len(manifest(d))):
            _poison(d, n, _fill(NAN))
    r = parity_cli("compare", a, b, "--json")
    rows = json.loads(r.out)["rows"]
    assert r.code == 1 and all(row["status"] == "fail" for row in rows)


def test_nan_only_in_b_fails(parity_cli, ref, tmp_path):
    b = copy_dump(ref, tmp_path / "b")
    line = _poison(b, 0, _at(3, NAN))
    r = parity_cli("compare", ref, b, "--json")
    bad = [row for row in json.loads(r.out)["rows"] if row["status"] == "fail"]
    assert r.code == 1 and [row["name"] for row in bad][:1] == [line["name"]] and "NaN/Inf 1/0" in bad[0]["reasons"]


def test_inf_at_different_positions_fails_at_the_same_positions_passes(parity_cli, ref, tmp_path):
    a, b, c = (copy_dump(ref, tmp_path / n) for n in "abc")
    line = _poison(a, 0, _at(0, -INF))
    _poison(b, 0, _at(1, -INF))
    _poison(c, 0, _at(0, -INF))
    r = parity_cli("compare", a, b, "--json", "--name", f"^{line['name']}$", "--phase", "prefill", "--steps", "0")
    (row,) = json.loads(r.out)["rows"]
    assert r.code == 1 and "at different positions" in row["reasons"]
    # the control: -inf where the reference has it (a masked score) is not a failure
    r = parity_cli("compare", a, c, "--json", "--name", f"^{line['name']}$", "--phase", "prefill", "--steps", "0")
    assert r.code == 0, r.out


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", ["--min-cos", "--max-norm-dev", "--max-rel-diff", "--atol", "--min-token-cos"])
def test_a_non_finite_threshold_is_refused(parity_cli, ref, option, value):
    assert_bad_input(parity_cli("compare", ref, ref, option, value), option, value)


def test_judge_never_passes_a_bitwise_nan_pair():
    nan_pair = TensorMetrics(numel=4, bitwise=True, cos=1.0, norm_ratio=1.0, nan_a=4, nan_b=4)
    assert any("reference itself produced NaN" in r for r in judge(nan_pair, Thresholds()))
    # the same counts at other positions
    moved = dataclasses.replace(nan_pair, bitwise=False, nan_a=0, nan_b=0, inf_a=1, inf_b=1)
    assert judge(moved, Thresholds(), same_positions=False) == ["NaN/Inf 0/1 on both sides but at different positions"]
    assert judge(moved, Thresholds(), same_positions=True) == []


def test_same_non_finite_positions_tells_signs_and_places_apart():
    a = torch.tensor([1.0, INF, -INF, NAN])
    assert same_non_finite_positions(a, a.clone())
    assert not same_non_finite_positions(a, torch.tensor([1.0, -INF, INF, NAN]))  # signs swapped
    assert not same_non_finite_positions(a, torch.tensor([NAN, INF, -INF, 1.0]))  # NaN moved
    fp8 = torch.tensor([0x7F, 0x01], dtype=torch.uint8).view(torch.float8_e4m3fn)  # 0x7F is e4m3's NaN
    assert not same_non_finite_positions(fp8, torch.tensor([0x01, 0x7F], dtype=torch.uint8).view(torch.float8_e4m3fn))

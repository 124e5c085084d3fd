"""`--threads` / `--device` / `--curve` of compare and bisect: same verdicts on any thread count, bad values exit 2."""

import json

import pytest


def test_threads_do_not_change_the_report(parity_cli, toy_dumps):
    fault = toy_dumps.fault(3, "prefill", "attn-count")
    one, two = (json.loads(parity_cli("compare", toy_dumps.ref, fault, "--json", "--threads", n).out) for n in "12")
    assert one["rows"] == two["rows"] and one["summary"]["fail"] > 0


def test_bisect_stops_at_the_first_failure_unless_curve(parity_cli, toy_dumps):
    fault = toy_dumps.fault(1, "decode", "attn-count")
    short = json.loads(parity_cli("bisect", toy_dumps.ref, fault, "--json").out)
    full = json.loads(parity_cli("bisect", toy_dumps.ref, fault, "--json", "--curve").out)
    assert short["summary"]["first"] == full["summary"]["first"]
    assert short["summary"]["records"] < full["summary"]["records"] and full["summary"]["curve"] == "full"
    assert short["rows"] == full["rows"][: len(short["rows"]) - 1] + [short["rows"][-1]]


def test_bisect_terminal_curve_ends_at_the_first_failure(parity_cli, toy_dumps):
    # a long run's curve has a row per (phase, step, layer block): the terminal shows the --limit rows leading into
    # the first failure, the JSON every row
    fault = toy_dumps.fault(1, "decode", "attn-count")
    rows = json.loads(parity_cli("bisect", toy_dumps.ref, fault, "--json", "--curve").out)["rows"]
    first = next(i for i, row in enumerate(rows) if row["status"] == "fail")
    assert first >= 2, "the case needs passing rows before its failure"
    shown = parity_cli("bisect", toy_dumps.ref, fault, "--curve", "--limit", "2").out
    assert f"the 2 rows up to the first failure; {len(rows) - 2} more hidden" in shown
    assert shown.count("│ FAIL") == 1 and shown.count("│ PASS") == 1
    assert rows[first]["first_failure"] in shown and f"│ {rows[first - 1]['block']} " in shown
    every = parity_cli("bisect", toy_dumps.ref, fault, "--curve", "--limit", "0").out
    assert "more hidden" not in every and every.count("│ PASS") == sum(row["status"] == "pass" for row in rows)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        pytest.param(("--threads", "0"), "--threads 0: expected a count >= 1", id="threads-0"),
        pytest.param(("--device", "tpu"), "--device 'tpu': expected cpu or cuda", id="device-tpu"),
    ],
)
def test_bad_data_path_options_exit_2(parity_cli, toy_dumps, option, message):
    r = parity_cli("compare", toy_dumps.ref, toy_dumps.same, *option)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err

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

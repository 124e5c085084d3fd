"""Each dump-reading command: exit codes, terminal output, --json / --csv / --out, and usage errors (exit 2)."""

import io
import json

import pandas as pd
import pytest
import torch

from tests.dump.toymodel import Fault, ToyLM

COMMANDS = ("dump-info", "compare", "bisect", "slot-invariance", "schema")


def test_help_lists_the_commands_with_their_docstrings(parity_cli):
    r = parity_cli("--help")
    assert r.code == 0 and all(c in r.out for c in COMMANDS)
    r = parity_cli("bisect", "--help")
    assert r.code == 0 and "Name the first record" in r.out and "--min-cos" in r.out


def test_dump_info(parity_cli, toy_dumps):
    r = parity_cli("dump-info", toy_dumps.ref)
    assert r.code == 0 and "prefill" in r.out and r.out.rstrip().splitlines()[-1].startswith("PASSED | 63 records")
    js = json.loads(parity_cli("dump-info", toy_dumps.ref, "--json").out)
    assert js["summary"]["phases"] == {"prefill": "0", "decode": "1-2"} and js["summary"]["layers"] == "0-4"
    assert js["rows"][0] == {
        "kind": "activation",
        "name": "layers.0.attn:out",
        "layer": 0,
        "class": "ToyAttention",
        "io": "output",
        "dtype": "float32",
        "shape": "[2, 5, 24], [2, 1, 24]",
        "records": 3,
        "phases": "prefill:0 decode:1-2",
        "mode": "full",
    }


def test_compare_pass_fail_and_machine_outputs(parity_cli, toy_dumps, tmp_path):
    assert parity_cli("compare", toy_dumps.ref, toy_dumps.same).code == 0
    bad = toy_dumps.fault(2, "prefill")
    r = parity_cli("compare", toy_dumps.ref, bad)
    assert r.code == 1 and "FAIL" in r.out and "PASS" in r.out
    js = json.loads(parity_cli("compare", toy_dumps.ref, bad, "--json").out)
    assert js["verdict"] == "fail" and js["summary"]["pairs"] == 63 and js["summary"]["fail"] > 0
    failing = [row for row in js["rows"] if row["status"] == "fail"]
    assert failing[0]["name"] == "layers.2.ffn:out" and failing[0]["reasons"] == "norm ratio off by 0.5 > 0.01"
    table = pd.read_csv(io.StringIO(parity_cli("compare", toy_dumps.ref, bad, "--csv").out))
    assert len(table) == 63 and {"cos", "max_abs", "rel_diff", "norm_ratio", "worst_token"} <= set(table.columns)
    out = tmp_path / "report.json"
    r = parity_cli("compare", toy_dumps.ref, bad, "--out", out)
    assert r.code == 1 and json.loads(out.read_text())["verdict"] == "fail" and f"wrote {out}" in r.out
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_compare_thresholds_and_selection(parity_cli, toy_dumps):
    bad = toy_dumps.fault(4, "decode")
    assert parity_cli("compare", toy_dumps.ref, bad, "--phase", "prefill").code == 0
    assert parity_cli("compare", toy_dumps.ref, bad, "--layers", "0-3").code == 0
    assert parity_cli("compare", toy_dumps.ref, bad, "--min-cos", "-1", "--max-norm-dev", "1e300").code == 0
    assert parity_cli("compare", toy_dumps.ref, toy_dumps.same, "--exact").code == 0


def test_compare_bf16_candidate_passes_defaults_and_logits(parity_cli, toy_dumps):
    bf16 = toy_dumps.custom("bf16", ToyLM().to(torch.bfloat16))
    # every record changes dtype on purpose: without --allow-dtype-change each one fails
    assert parity_cli("compare", toy_dumps.ref, bf16).code == 1
    r = parity_cli("compare", toy_dumps.ref, bf16, "--allow-dtype-change", "--logits", "^head:out$", "--json")
    js = json.loads(r.out)
    assert r.code == 0 and js["verdict"] == "pass"
    head = [row for row in js["rows"] if row["name"] == "head:out"]
    assert len(head) == 3 and all(row["top1"] >= 0.9 and row["kl"] < 1e-4 for row in head)
    # bf16 rounding may flip a near-tied argmax (it does on the dev box: top-1 0.9 in prefill); cos cannot see
    # that, a top-1 gate can
    assert min(row["cos"] for row in head) > 0.9999
    flips = min(row["top1"] for row in head) < 1.0
    strict = parity_cli(
        "compare", toy_dumps.ref, bf16, "--allow-dtype-change", "--logits", "^head:out$", "--min-top1", "1.0", "--json"
    )
    reasons = {row["reasons"].split(" 0.")[0] for row in json.loads(strict.out)["rows"] if row["status"] == "fail"}
    assert (strict.code, reasons) == ((1, {"top-1 agreement"}) if flips else (0, set()))
    assert parity_cli("compare", toy_dumps.ref, bf16, "--exact").code == 1


def test_compare_missing_records_and_allow_missing(parity_cli, toy_dumps):
    blocks_only = toy_dumps.custom("blocks", ToyLM(), modules=r"^layers\.\d+$")
    r = parity_cli("compare", toy_dumps.ref, blocks_only, "--json")
    assert r.code == 1 and json.loads(r.out)["summary"]["missing_in_b"] == 3 * (5 * 2 + 1)
    assert parity_cli("compare", toy_dumps.ref, blocks_only, "--allow-missing", r"(attn|ffn|head):out$").code == 0


def test_compare_with_a_name_map(parity_cli, toy_dumps, tmp_path):
    renamed = toy_dumps.custom("renamed", ToyLM(), modules=r"^layers\.\d+$", layer_regex=r"layers\.(\d+)")
    m = tmp_path / "map.toml"
    m.write_text("ignore = ['(attn|ffn|head):out$']\n")
    assert parity_cli("compare", toy_dumps.ref, renamed, "--map", m).code == 0


def test_schema(parity_cli, toy_dumps):
    assert parity_cli("schema", toy_dumps.ref, toy_dumps.same).code == 0
    bf16 = toy_dumps.custom("bf16", ToyLM().to(torch.bfloat16))
    r = parity_cli("schema", toy_dumps.ref, bf16, "--json")
    rows = json.loads(r.out)["rows"]
    assert r.code == 1 and len(rows) == 21 and rows[0]["issue"] == "dtype" and rows[0]["records"] == 3


def test_slot_invariance(parity_cli, toy_dumps):
    clean = toy_dumps.custom("same-prompt", ToyLM())
    assert parity_cli("slot-invariance", clean, "--solo", toy_dumps.ref).code == 0
    leak = toy_dumps.custom("leak", ToyLM(fault=Fault(3, "decode", "mate-leak")))
    r = parity_cli("slot-invariance", leak, "--solo", toy_dumps.ref)
    assert r.code == 1 and "first slot divergence: phase decode, step 1, layer 3" in r.out


def test_slot_invariance_without_layouts_is_bad_input(parity_cli, tmp_path, write_untagged):
    r = parity_cli("slot-invariance", write_untagged(tmp_path))
    assert r.code == 2 and "nothing to compare" in r.err and len(r.err.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("compare", "{ref}", "{ref}", "--json", "--csv"), "--json and --csv are exclusive", id="json-csv"),
        pytest.param(("compare", "{ref}", "{ref}", "--out", "r.txt"), "add --json or --csv", id="out-suffix"),
        pytest.param(("compare", "{ref}", "/nonexistent/dump"), "no such dump dir", id="missing-dir"),
        pytest.param(("compare", "{ref}", "{ref}", "--steps", "x"), "--steps='x'", id="bad-steps"),
        pytest.param(("compare", "{ref}", "{ref}", "--phase", "warmup"), "not a phase", id="bad-phase"),
        pytest.param(("compare", "{ref}", "{ref}", "--name", "("), "not a valid regex", id="bad-regex"),
        pytest.param(("compare", "{ref}", "{ref}", "--logits", "("), "logits regex '(': not a valid", id="bad-logits"),
        pytest.param(("compare", "{ref}", "{ref}", "--allow-missing", "("), "allow_missing regex '('", id="bad-allow"),
        pytest.param(("compare", "{ref}", "{ref}", "--phase", "mtp-draft"), "no record to compare", id="empty"),
        pytest.param(("bisect", "{ref}", "{ref}", "--map", "/nonexistent.toml"), "cannot read name map", id="map"),
        pytest.param(("dump-info", "/nonexistent/dump"), "no such dump dir", id="dump-info-missing"),
    ],
)
def test_usage_errors_exit_2_with_one_line(parity_cli, toy_dumps, args, message):
    r = parity_cli(*(a.format(ref=toy_dumps.ref) for a in args))
    assert r.code == 2 and message in r.err and len(r.err.splitlines()) == 1 and "Traceback" not in r.err

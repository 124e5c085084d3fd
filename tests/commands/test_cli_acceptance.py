"""The issue's acceptance checks, through the CLI a user runs."""

import json
import shutil

import pytest

from tests.commands.conftest import parity_subprocess


@pytest.mark.parametrize(
    ("layer", "phase", "kind", "module", "step"),
    [
        pytest.param(0, "prefill", "ffn-scale", "ffn", 0, id="L0-prefill"),
        pytest.param(3, "prefill", "attn-count", "attn", 0, id="L3-prefill"),
        pytest.param(1, "decode", "attn-count", "attn", 1, id="L1-decode"),
        pytest.param(4, "decode", "ffn-scale", "ffn", 1, id="L4-decode"),
    ],
)
def test_bisect_names_the_planted_layer_and_phase_and_exits_1(parity_cli, toy_dumps, layer, phase, kind, module, step):
    r = parity_cli("bisect", toy_dumps.ref, toy_dumps.fault(layer, phase, kind))
    assert r.code == 1, r.out + r.err
    where = (
        f"phase {phase}, step {step}, layer {layer}, module layers.{layer}.{module}, record layers.{layer}.{module}:out"
    )
    assert f"first divergence: {where}: " in r.out
    assert r.out.rstrip().splitlines()[-1].startswith(f"FAILED | {where} |")
    js = parity_cli("bisect", toy_dumps.ref, toy_dumps.fault(layer, phase, kind), "--json")
    first = json.loads(js.out)["summary"]["first"]
    assert js.code == 1 and (first["phase"], first["step"], first["layer"]) == (phase, step, layer)


def test_bisect_identical_runs_exits_0(parity_cli, toy_dumps):
    r = parity_cli("bisect", toy_dumps.ref, toy_dumps.same)
    assert r.code == 0 and "no divergence" in r.out and r.out.rstrip().splitlines()[-1].startswith("PASSED |")


def _truncate_a_tensor_file(d):
    path = next((d / "tensors").iterdir())
    path.write_bytes(path.read_bytes()[:-10])


def _wrong_shape_in_manifest(d):
    lines = (d / "manifest.jsonl").read_text().splitlines()
    obj = json.loads(lines[3])
    obj["shape"] = [obj["shape"][0] + 1, *obj["shape"][1:]]
    lines[3] = json.dumps(obj)
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        pytest.param(_truncate_a_tensor_file, "not a readable safetensors file", id="truncated-safetensors"),
        pytest.param(
            _wrong_shape_in_manifest,
            "manifest.jsonl line 4): tensor 'out.1' has shape [2, 5] in the file but [3, 5]",
            id="manifest-wrong-shape",
        ),
        pytest.param(lambda d: (d / "manifest.jsonl").unlink(), "no manifest.jsonl here", id="no-manifest"),
    ],
)
def test_bad_inputs_exit_2_with_one_clear_line(tmp_path, toy_dumps, corrupt, message):
    bad = tmp_path / "bad"
    shutil.copytree(toy_dumps.ref, bad)
    corrupt(bad)
    r = parity_subprocess("bisect", toy_dumps.ref, bad)
    assert r.code == 2 and r.out == ""
    assert len(r.err.splitlines()) == 1 and "Traceback" not in r.err
    assert r.err.startswith("error: ") and message in r.err and str(bad) in r.err

"""Bad kernel repro folders for `parity repro DIR`: a repro JSON that is damaged or of the wrong shape at any key, a
missing or cut safetensors file, an unknown `--run` / `--backend` / `--device`, a folder with no repro. Each is one
line naming the file and the key (a script's own refusal is surfaced with its reason), exit 2, never a traceback
and never counted as a reproduced failure (exit 1). The repro is built here from one `rms_norm` call, no run."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from parity.repro import codec
from parity.repro.script import script_text
from tests.badinput.conftest import assert_bad_input, tree

STEM = "repro_rms_norm"


@pytest.fixture
def folder(tmp_path):
    """`tmp_path/f/repro/repro_rms_norm.{json,safetensors,py}`: what extraction writes, for one rms_norm call with
    the torch backend (bitwise to its twin: the repro passes)."""
    out = tmp_path / "f" / "repro"
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 256, generator=g).to(torch.bfloat16), torch.rand(256, generator=g).to(torch.bfloat16), 1e-6)
    tensors: dict = {}
    meta = {
        "schema": 1,
        "op": "rms_norm",
        "ran": {"backend": "torch", "plant": None, "impl": None, "replaced": None},
        "n_layers": 4,
        "device": "cpu",
        "call_site": {"site": "layers.0.attn_norm", "step": 0, "request": "0", "position": 0},
        "verdict": {"site": "layers.0.attn_norm", "field": "out", "phase": "prefill", "threshold": 0.0},
        "threshold": 0.0,
        "tensors": f"{STEM}.safetensors",
        "args": codec.encode(args, tensors, "args"),
        "kwargs": {},
        "output": None,
        "result": {"candidate": "the 'torch' backend"},
        "reproduces": False,
    }
    save_file(tensors, out / f"{STEM}.safetensors")
    (out / f"{STEM}.json").write_text(json.dumps(meta))
    (out / f"{STEM}.py").write_text(script_text("rms_norm", STEM))
    os.chmod(out / f"{STEM}.py", 0o755)
    return tmp_path / "f"


def _meta(folder, edit) -> None:
    path = folder / "repro" / f"{STEM}.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def test_the_built_repro_runs_and_passes(parity_cli, folder):
    """The control: the repro as built lists and runs (a subprocess), bitwise to its twin."""
    r = parity_cli("repro", folder)
    assert r.code == 0 and "PASSED | 1/1 repros pass" in r.out, (r.out, r.err)


@pytest.mark.parametrize(
    ("edit", "culprits"),
    [
        pytest.param(lambda m: m.pop("op"), ("missing key 'op'",), id="no-op"),
        pytest.param(lambda m: m.pop("tensors"), ("missing key 'tensors'",), id="no-tensors"),
        pytest.param(lambda m: m.update(op=5), ("key 'op'", "found 5"), id="op-int"),
        pytest.param(lambda m: m.update(op="no_such_op"), ("'no_such_op' is not an op of the registry",), id="op"),
        pytest.param(lambda m: m.update(call_site="x"), ("key 'call_site'", "found 'x'"), id="call-site-str"),
        pytest.param(lambda m: m["call_site"].pop("step"), ("key 'call_site.step'", "nothing"), id="no-step"),
        pytest.param(lambda m: m["result"].pop("candidate"), ("key 'result.candidate'",), id="no-candidate"),
        pytest.param(lambda m: m.update(ran="torch"), ("key 'ran'", "found 'torch'"), id="ran-str"),
        pytest.param(lambda m: m["ran"].update(backend="cuda"), ("'ran.backend'", "'cuda'", "torch"), id="ran-backend"),
        pytest.param(lambda m: m.update(threshold="big"), ("key 'threshold'", "finite number >= 0"), id="thr-str"),
        pytest.param(lambda m: m.update(threshold=float("nan")), ("key 'threshold'", "nan"), id="thr-nan"),
        pytest.param(lambda m: m.update(threshold=-1), ("key 'threshold'", "-1"), id="thr-negative"),
        pytest.param(lambda m: m.update(tensors="../../x.safetensors"), ("key 'tensors'", "file name"), id="escape"),
        pytest.param(lambda m: m.update(device="tpu"), ("key 'device'", "'tpu'"), id="device"),
        pytest.param(lambda m: m.update(n_layers="4"), ("key 'n_layers'", "'4'"), id="n-layers-str"),
        pytest.param(lambda m: m.update(kwargs=[1]), ("key 'kwargs'", "[1]"), id="kwargs-list"),
        pytest.param(lambda m: m.update(args={"tuple": [{"dtype": "float99"}]}), ("args.0", "float99"), id="dtype"),
        pytest.param(
            lambda m: m.update(args={"tuple": [{"dataclass": "os:system", "fields": {}}]}), ("args.0", "'os:system'"),
            id="foreign-class",
        ),
        pytest.param(lambda m: m.update(args={"tuple": [{"bogus": 1}]}), ("args.0", "unknown argument"), id="spec"),
        pytest.param(lambda m: m["verdict"].update(threshold="x"), ("'verdict.threshold'",), id="verdict-threshold"),
    ],
)  # fmt: skip
def test_a_bad_repro_json_is_refused_before_any_script_runs(parity_cli, folder, edit, culprits):
    _meta(folder, edit)
    before = tree(folder)
    assert_bad_input(parity_cli("repro", folder), f"{STEM}.json", *culprits)
    assert_bad_input(parity_cli("repro", folder, "--list"), f"{STEM}.json", *culprits)
    assert tree(folder) == before


@pytest.mark.parametrize(
    "data", [pytest.param(b"", id="empty"), pytest.param(b"[1]", id="a-list"), pytest.param(b"\xff{", id="bytes")]
)
def test_a_damaged_repro_json(parity_cli, folder, data):
    (folder / "repro" / f"{STEM}.json").write_bytes(data)
    assert_bad_input(parity_cli("repro", folder), f"{STEM}.json")


def test_a_cut_safetensors_file_is_named_by_the_scripts_reason(parity_cli, folder):
    """The script refuses it (exit 2); `parity repro` says so in one line with the script's reason, not as a
    reproduced failure."""
    st = folder / "repro" / f"{STEM}.safetensors"
    st.write_bytes(st.read_bytes()[:-16])
    assert_bad_input(parity_cli("repro", folder), "repro_rms_norm: the script refused", str(st), "not a readable")


@pytest.mark.parametrize(
    ("args", "culprits"),
    [
        pytest.param(("--run", "nosuch"), ("--run 'nosuch'", "valid: repro_rms_norm"), id="run"),
        pytest.param(("--backend", "bogus"), ("--backend 'bogus'", "op rms_norm", "torch, triton"), id="backend"),
        pytest.param(("--backend", "aiter"), ("--backend 'aiter'", "op rms_norm"), id="backend-not-of-op"),
        pytest.param(("--device", "gpu0"), ("--device 'gpu0'", "cpu or cuda"), id="device"),
        pytest.param(("--plant", "x"), ("--plant", "--extract"), id="plant-alone"),
    ],
)
def test_bad_options(parity_cli, folder, args, culprits):
    assert_bad_input(parity_cli("repro", folder, *args), *culprits)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
def test_cuda_on_a_machine_without_it(parity_cli, folder):
    assert_bad_input(parity_cli("repro", folder, "--device", "cuda"), "--device 'cuda'", "no CUDA device")


def test_folders_with_nothing_to_run(parity_cli, tmp_path):
    """No repro at all is not 'PASSED 0/0'; a missing folder or a file says which it is."""
    assert_bad_input(parity_cli("repro", tmp_path), str(tmp_path), "no kernel repros")
    assert_bad_input(parity_cli("repro", tmp_path / "nosuch"), "nosuch", "no such directory")
    (tmp_path / "f").write_text("x")
    assert_bad_input(parity_cli("repro", tmp_path / "f"), str(tmp_path / "f"), "not a directory")

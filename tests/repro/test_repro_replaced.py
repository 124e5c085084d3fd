"""Kernel repro of a buggy kernel of the user's own (a RoPE that rotates every token by the next token's angle),
in a module of a scratch folder that the run imports and swaps in for the `rope` op. The verdict names layer 0's
`attn.q` (the query after wq_b, the head norm and RoPE); among the calls of that segment only RoPE disagrees with
its twin (the reference's `apply_rotary_emb`), so the repro must be RoPE's. Its script reloads the kernel from
the module by name: it fails, and passes once the module is fixed on disk, and with `--backend torch`.

One failing run of the tiny case per module, shared by the tests below."""

import dataclasses
import importlib
import json
import sys
import textwrap

import pytest

from parity.cases import load_case
from parity.repro import write_kernel_repros
from parity.run import prepare_checkpoint, run_case
from tests.repro.scripts import run_script

MODULE = "scratch_rope_kernel"
BUGGY = """
    import torch
    from parity.optimized.ops.rope import rope_torch

    def rope(x, freqs_cis, inverse=False):
        return rope_torch(x, torch.roll(freqs_cis, -1, 0), inverse)  # planted: the next token's angle
"""
FIXED = """
    from parity.optimized.ops.rope import rope_torch

    def rope(x, freqs_cis, inverse=False):
        return rope_torch(x, freqs_cis, inverse)
"""


@pytest.fixture(scope="module")
def replaced(tmp_path_factory, tiny_ckpt):
    kernels = tmp_path_factory.mktemp("kernels")
    (kernels / f"{MODULE}.py").write_text(textwrap.dedent(BUGGY))
    sys.path.insert(0, str(kernels))
    try:
        module = importlib.import_module(MODULE)
        swap = lambda ops: dataclasses.replace(ops, rope=module.rope)
        case = load_case("tiny")
        folder = tmp_path_factory.mktemp("replaced")
        report = run_case(case, prepare_checkpoint(case, tiny_ckpt, folder), transform_ops=swap)
        paths = write_kernel_repros(report, folder, case=case, transform_ops=swap)
    finally:
        sys.path.remove(str(kernels))
        sys.modules.pop(MODULE, None)
    return report, folder, paths, kernels


def test_the_repro_is_ropes_at_the_query_site(replaced):
    report, folder, paths, _ = replaced
    assert not report.passed and "layers.0.attn.q:" in report.location
    assert paths == [folder / "repro" / "repro_rope.py"]
    meta = json.loads((folder / "repro" / "repro_rope.json").read_text())
    assert meta["ran"] == {
        "backend": "torch", "plant": None, "impl": f"{MODULE}:rope", "replaced": f"{MODULE}.rope",
    }  # fmt: skip
    assert meta["call_site"]["site"] == "layers.0.attn.q" and meta["call_site"]["in_site_segment"]
    assert meta["twin"].startswith("parity.reference.model.apply_rotary_emb")
    # the query's rope part [T, h, rd] and the rows of freqs_cis [T, rd/2] complex64
    x, freqs = meta["args"]["tuple"][:2]
    assert x["dtype"] == "torch.bfloat16" and len(x["shape"]) == 3 and freqs["dtype"] == "torch.complex64"


def test_script_fails_then_passes_once_the_kernel_is_fixed(replaced):
    _, folder, _, kernels = replaced
    path = folder / "repro" / "repro_rope.py"
    buggy = run_script(path, pythonpath=kernels)
    assert buggy.returncode == 1 and buggy.stdout.rstrip().endswith("FAIL"), buggy.stdout + buggy.stderr
    assert f"candidate {MODULE}:rope" in buggy.stdout
    other = run_script(path, "--backend", "torch")
    assert other.returncode == 0 and other.stdout.rstrip().endswith("PASS"), other.stdout + other.stderr
    (kernels / f"{MODULE}.py").write_text(textwrap.dedent(FIXED))
    fixed = run_script(path, pythonpath=kernels)
    assert fixed.returncode == 0 and fixed.stdout.rstrip().endswith("PASS"), fixed.stdout + fixed.stderr
    assert "candidate output identical to the run's: False" in fixed.stdout  # the run had the bug


def test_script_without_the_kernel_module_is_bad_input(replaced):
    _, folder, _, _ = replaced
    missing = run_script(folder / "repro" / "repro_rope.py")
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and MODULE in missing.stderr

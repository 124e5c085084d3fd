"""Cases naming a candidate engine: `candidate` and `quant_sim_off` parsed, bad values refused with one line; the
dispatch refuses the optimized engine's options for HF before any work, and so do `parity calibrate` and `parity
selftest`; the run tables name the candidate (none of this needs transformers)."""

import re
import sys
from pathlib import Path

import pytest

from parity.calibrate import calibrate, calibrate_refuses
from parity.cases import load_case, parse_case
from parity.commands import run as run_command
from parity.compare.thresholds import NoiseModel
from parity.engines import run_candidate
from parity.errors import ParityError
from parity.optimized.ops import OpsConfig
from parity.run import RunReport
from parity.selftest.run import selftest, selftest_refuses
from tests.commands.conftest import parity_cli  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "x", "model": {"preset": "tiny"}, "requests": [{"prompt_len": 5, "decode_steps": 1}]}


def test_default_candidate_is_the_optimized_engine():
    case = parse_case(BASE, "x.toml")
    assert case.candidate == "optimized" and case.quant_sim_off == ()


def test_hf_case_names_transformers_with_both_switches_off():
    case = load_case(str(ROOT / "cases" / "hf_tiny.toml"))
    assert case.candidate == "transformers" and case.quant_sim_off == ("kv", "indexer")
    assert case.engine.mtp_draft == 0 and case.model_args().dtype == "bf16"


def test_transformers_defaults_to_both_switches_off():
    case = parse_case({**BASE, "candidate": "transformers", "engine": {"mtp_draft": 0}}, "x.toml")
    assert case.quant_sim_off == ("kv", "indexer")


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"candidate": "vllm"}, r"x.toml: candidate must be one of \['optimized', 'transformers'\], got 'vllm'"),
        ({"candidate": 3}, "candidate must be one of"),
        ({"quant_sim_off": ["kv"]}, "quant_sim_off is for other candidates"),
        ({"candidate": "transformers", "engine": {"mtp_draft": 0}, "quant_sim_off": ["weights"]},
         r"quant_sim_off must be a list of \['kv', 'indexer'\], got \['weights'\]"),
        ({"candidate": "transformers", "engine": {"mtp_draft": 0}, "quant_sim_off": "kv"}, "must be a list"),
        ({"candidate": "transformers"}, "engine.mtp_draft must be 0 for candidate 'transformers'"),
    ],
)  # fmt: skip
def test_bad_candidate_fields_are_one_line_errors(patch, message):
    with pytest.raises(ParityError, match=message) as e:
        parse_case({**BASE, **patch}, "x.toml")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bisect": True}, "--bisect: only for the optimized engine"),
        ({"plant": "sink-scaled"}, "--plant: only for the optimized engine"),
        ({"golden": "always"}, "--golden always"),
    ],
)
def test_optimized_only_options_are_refused_for_hf(kwargs, message, tmp_path):
    case = load_case(str(ROOT / "cases" / "hf_tiny.toml"))
    with pytest.raises(ParityError, match=message):
        run_candidate(case, tmp_path, **kwargs)


def test_without_transformers_the_hf_candidate_says_how_to_install_it(monkeypatch):
    from parity.engines import transformers as hf  # importable without transformers: it imports it on use

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without the extra sees
    with pytest.raises(ParityError, match=r"candidate 'transformers' needs HF transformers .*parity\[transformers\]"):
        hf.require()


# `parity calibrate` varies the optimized engine's batching and schedules, `parity selftest` plants bugs into it:
# on a case that names another candidate they would measure or test the optimized engine under the HF case's name
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "{case}", "--out", "{tmp}/noise.json"],
         r"^error: parity calibrate: case 'hf_tiny' names candidate 'transformers'; .*parity\.engines\.hf_noise"),
        (["selftest", "{case}", "--out", "{tmp}/out"],
         r"^error: parity selftest: case 'hf_tiny' names candidate 'transformers'; .*optimized engine only"),
    ],
)  # fmt: skip
def test_calibrate_and_selftest_refuse_an_hf_case_with_one_line(parity_cli, tmp_path, argv, message):  # noqa: F811
    args = [a.format(case=ROOT / "cases" / "hf_tiny.toml", tmp=tmp_path) for a in argv]
    r = parity_cli(*args)
    assert r.code == 2
    assert re.search(message, r.err.strip()) and len(r.err.strip().splitlines()) == 1, r.err
    assert list(tmp_path.iterdir()) == []  # refused before any work: no noise model, no checkpoint


def test_the_jobs_refuse_an_hf_case_when_called_as_functions(tmp_path):
    case = load_case(str(ROOT / "cases" / "hf_tiny.toml"))
    with pytest.raises(ParityError, match="parity calibrate: case 'hf_tiny' names candidate 'transformers'"):
        calibrate(case, tmp_path)
    with pytest.raises(ParityError, match="parity selftest: case 'hf_tiny' names candidate 'transformers'"):
        selftest(case, tmp_path, [], NoiseModel())
    assert list(tmp_path.iterdir()) == []
    # the optimized engine's cases pass the same check (the tiny case is decode-exact: calibrated with a kernel
    # that is not bitwise, tests/test_calibrate_refusals.py)
    calibrate_refuses(load_case("tiny"), OpsConfig(overrides=(("dense_linear", "triton"),)))
    selftest_refuses(load_case("tiny"))


@pytest.mark.parametrize(
    ("backends", "engine"),
    [({"candidate": "transformers 5.23.0"}, "transformers 5.23.0"), ({"fp8_gemm": "torch"}, "the optimized engine")],
)
def test_the_run_tables_name_the_candidate(monkeypatch, backends, engine):
    titles = []

    class Recording(run_command.Table):
        def __init__(self, *a, title=None, **kw):
            titles.append(title)
            super().__init__(*a, title=title, **kw)

    monkeypatch.setattr(run_command, "Table", Recording)
    report = RunReport("hf_tiny", "ckpt", "cpu", {}, backends, False, "noise", True, "")
    run_command.render(report)
    assert titles == [
        f"own error per site: {engine} teacher-forced with the reference",
        f"requests: chained run ({engine} on its own)",
    ]

"""Cases naming a candidate engine: `candidate` and `quant_sim_off` parsed, bad values refused with one line; the
dispatch refuses the optimized engine's options for HF before any work (none of this needs transformers)."""

import sys
from pathlib import Path

import pytest

from parity.cases import load_case, parse_case
from parity.engines import run_candidate
from parity.errors import ParityError

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

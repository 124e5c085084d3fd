"""`parity calibrate` on decode-exact cases (most shipped cases are): refused when every selected op is bitwise
(the run judges them bitwise: nothing to measure), calibrated when a kernel that is not bitwise is selected (the run
judges that mix by a noise model and tells the user to calibrate it; before, calibrate refused every such case)."""

import pytest

from parity.calibrate import calibrate, calibrate_refuses
from parity.cases import load_case
from parity.errors import ParityError
from parity.optimized.ops import OpsConfig
from parity.run import noise_model
from tests.commands.conftest import parity_cli  # noqa: F401  (fixture)

APPROX = OpsConfig(overrides=(("dense_linear", "triton"),))  # the triton dense_linear claims a tolerance, not bits


def test_a_decode_exact_case_on_bitwise_ops_is_refused():
    case = load_case("tiny")
    assert case.engine.decode_exact_chunks and noise_model(case, OpsConfig()).exact
    with pytest.raises(ParityError, match="decode-exact and every selected op is bitwise"):
        calibrate_refuses(case, OpsConfig())


def test_the_command_refuses_it_in_one_line_before_any_work(parity_cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.delenv("PARITY_BACKEND", raising=False)
    monkeypatch.delenv("PARITY_OPS", raising=False)
    out = tmp_path / "noise.json"
    r = parity_cli("calibrate", "tiny", "--out", out)
    assert r.code == 2, r
    assert len(r.err.strip().splitlines()) == 1 and "decode-exact" in r.err, r.err
    assert not out.exists()


def test_a_decode_exact_case_with_a_non_bitwise_kernel_is_calibrated(tmp_path, monkeypatch):
    case = load_case("tiny")
    assert not noise_model(case, APPROX).exact  # what the run judges this mix by: a noise model
    calibrate_refuses(case, APPROX)
    monkeypatch.setenv("PARITY_OPS", "dense_linear=triton")
    model = calibrate(case, tmp_path, n=1)
    assert model.provenance["backends"]["dense_linear"] == "triton"
    assert model.errors, "no site was measured"
    # the sites fed by the triton dense_linear moved (on the tiny model its projections' last bits vanish in the
    # compressor's FP8 rounding; the head's logits keep them); a bitwise run measures zeros everywhere
    assert model.errors["output_logits|out.0|decode"] > 0, sorted(model.errors.items())

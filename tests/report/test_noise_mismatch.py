"""The line that says a run is judged by thresholds measured for another backend mix or device
(`parity.report.tables.noise_mismatch`), shown by `parity run` and in the report pages."""

from dataclasses import replace

from parity.cases import load_case
from parity.compare.thresholds import NoiseModel
from parity.optimized.ops import OpsConfig
from parity.report.tables import noise_mismatch
from parity.run import noise_model

TORCH = {"fp8_gemm": "torch", "moe_experts": "torch", "sparse_attn": "torch", "rope": "torch", "hc_pre": "torch"}
CPU_TORCH = {"backends": TORCH, "device": "cpu", "machine": {"cpu": "AMD EPYC"}}


def rep(backends, device="cpu", noise="cases/batched.noise.json", provenance=CPU_TORCH) -> dict:
    return {"backends": backends, "device": device, "noise": noise, "noise_provenance": provenance}


def test_a_calibration_of_this_mix_says_nothing():
    assert noise_mismatch(rep(TORCH)) == ""
    assert noise_mismatch(rep(dict(TORCH, candidate="transformers 5.23.0"))) == ""  # another engine: no ops to match
    assert noise_mismatch(rep(TORCH, device="cuda:0", provenance=dict(CPU_TORCH, device="cuda"))) == ""


def test_other_backends_and_device_are_named_with_the_calibrate_command():
    mix = dict(TORCH, fp8_gemm="triton", moe_experts="triton")
    line = noise_mismatch(rep(mix, device="cuda"))
    assert "fp8_gemm, moe_experts on triton (calibrated: torch)" in line
    assert "sparse_attn" not in line.split(";")[0]  # the op that matches is not listed
    assert "device cuda (calibrated: cpu)" in line
    assert "PARITY_OPS=fp8_gemm=triton,moe_experts=triton parity calibrate CASE --out FILE --device cuda" in line


def test_the_device_alone_is_a_mismatch():
    line = noise_mismatch(rep(TORCH, device="cuda"))
    assert line.startswith("the noise model was calibrated for another mix: device cuda (calibrated: cpu)")
    assert "PARITY_OPS" not in line  # all torch: nothing to select


def test_defaults_with_non_bitwise_kernels_ask_for_a_calibration():
    line = noise_mismatch(rep(dict(TORCH, fp8_gemm="triton"), noise="defaults (non-bitwise ops selected: fp8_gemm)",
                              provenance={}))  # fmt: skip
    assert line.startswith("non-bitwise kernels are judged by the default allowances")
    assert "PARITY_OPS=fp8_gemm=triton parity calibrate CASE" in line
    assert noise_mismatch(rep(TORCH, noise="defaults", provenance={})) == ""
    assert noise_mismatch(rep(TORCH, noise="decode-exact", provenance={})) == ""


def test_a_mix_mostly_on_one_backend_is_selected_by_default_plus_exceptions():
    mix = {op: "triton" for op in TORCH} | {"o_lora": "aiter"}
    line = noise_mismatch(rep(mix, device="cuda", provenance={"backends": TORCH, "device": "cuda"}))
    assert "PARITY_BACKEND=triton PARITY_OPS=o_lora=aiter parity calibrate CASE" in line


def test_many_ops_moved_together_are_counted_not_listed():
    everything = {op: "triton" for op in TORCH}
    line = noise_mismatch(rep(everything))
    assert line.startswith("the noise model was calibrated for another mix: 5 ops on triton (calibrated: torch);")
    assert "PARITY_BACKEND=triton parity calibrate CASE --out FILE, then" in line


def test_the_run_s_own_defaults_source_is_recognized():
    # the source string parity.run.noise_model gives a non-exact case with non-bitwise kernels, not a copy of it
    case = load_case("tiny")
    case = replace(case, engine=replace(case.engine, decode_exact_chunks=False))
    noise = noise_model(case, OpsConfig(default="torch", overrides=(("fp8_gemm", "triton"),)))
    assert isinstance(noise, NoiseModel) and noise.source.endswith("fp8_gemm)")
    line = noise_mismatch(rep(dict(TORCH, fp8_gemm="triton"), noise=noise.source, provenance={}))
    assert line.startswith("non-bitwise kernels are judged by the default allowances")

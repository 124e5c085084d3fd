"""The reference's quantization switches (`parity.engines.quant`): they turn the KV fake-quant and the indexer's
Hadamard + FP4 into identities inside the block only; the default reference path stays bit-exact."""

import pytest
import torch

from parity.engines.quant import check_switches, quant_sim_off
from parity.errors import ParityError
from parity.reference import kernels

SEAM = ("act_quant", "act_quant_initial", "fp4_act_quant", "hadamard_transform")


def _logits(make_model, tokens):
    return make_model()(tokens, 0)


def test_default_path_is_untouched_after_the_switches(make_model):
    before = {name: getattr(kernels, name) for name in SEAM}
    tokens = torch.randint(0, 1024, (1, 40), generator=torch.Generator().manual_seed(3))
    default = _logits(make_model, tokens)
    with quant_sim_off():
        off = _logits(make_model, tokens)
    after = _logits(make_model, tokens)
    assert torch.equal(default, after)
    assert all(getattr(kernels, name) is fn for name, fn in before.items())
    # the switches do change the computation (a no-op switch would pass the line above too)
    assert not torch.equal(default, off)


def test_only_the_in_place_fake_quant_becomes_an_identity():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    want_q = kernels.act_quant(x.clone(), 128, "ue8m0", torch.float32)
    with quant_sim_off():
        y = x.clone()
        assert torch.equal(kernels.act_quant(y, 64, "ue8m0", torch.float32, True), x)
        assert torch.equal(y, x)
        assert torch.equal(kernels.fp4_act_quant(y, 32, True), x)
        assert torch.equal(kernels.hadamard_transform(y, scale=0.1), x)
        # activation quantization before an FP8/FP4 GEMM is not a simulation switch: unchanged
        got_q = kernels.act_quant(x.clone(), 128, "ue8m0", torch.float32)
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(got_q, want_q))
    y = x.clone()
    assert not torch.equal(kernels.act_quant(y, 64, "ue8m0", torch.float32, True), x)  # on again outside


def test_one_switch_leaves_the_other_on():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with quant_sim_off(("kv",)):
        assert not torch.equal(kernels.hadamard_transform(x.clone(), scale=0.125), x)
    with quant_sim_off(("indexer",)):
        assert not torch.equal(kernels.act_quant(x.clone(), 64, "ue8m0", torch.float32, True), x)


def test_unknown_switch_is_refused():
    with pytest.raises(ParityError, match=r"unknown quantization switch\(es\) \['weights'\]"):
        check_switches(["weights"], "case")
    with pytest.raises(ParityError):
        with quant_sim_off(("weights",)):
            pass

"""judge(): each threshold passes a clean pair and fails a pair planted to cross exactly that threshold."""

import dataclasses

import pytest

from parity.compare import TensorMetrics, Thresholds, judge
from parity.compare.metrics import LogitMetrics

CLEAN = TensorMetrics(
    numel=10,
    bitwise=False,
    cos=0.99995,
    max_abs=1e-3,
    max_rel=1e-2,
    rel_l2=1e-3,
    rel_diff=5e-5,
    norm_ratio=1.001,
    mismatches=0,
    worst_token=((3,), 0.9999),
)


def test_clean_bf16_noise_passes_defaults():
    assert judge(CLEAN, Thresholds()) == []


@pytest.mark.parametrize(
    ("planted", "thresholds", "match"),
    [
        pytest.param({"cos": 0.998}, Thresholds(), "cos 0.998000 < 0.999", id="min-cos"),
        pytest.param({"norm_ratio": 1.02}, Thresholds(), "norm ratio off by 0.02", id="norm-up"),
        pytest.param({"norm_ratio": 0.5}, Thresholds(), "norm ratio off by 0.5", id="norm-dropped-scale"),
        pytest.param({"rel_diff": 1e-2}, Thresholds(max_rel_diff=1e-3), "rel_diff 0.01 > 0.001", id="rel-diff"),
        pytest.param({"mismatches": 3}, Thresholds(atol=1e-4), "3 elements beyond atol", id="atol"),
        pytest.param({"worst_token": ((7,), 0.9)}, Thresholds(min_token_cos=0.999), "token cos", id="token-cos"),
        pytest.param({"nan_b": 2}, Thresholds(), "NaN/Inf 2/0 vs 0/0", id="nan"),
        pytest.param({"inf_a": 1}, Thresholds(), "NaN/Inf 0/0 vs 0/1", id="inf-lost"),
        pytest.param({"cos": float("nan")}, Thresholds(), "cos nan", id="nan-metric"),
        pytest.param({}, Thresholds(exact=True), "not bitwise equal", id="exact"),
    ],
)
def test_each_gate_fails_its_planted_metric(planted, thresholds, match):
    reasons = judge(dataclasses.replace(CLEAN, **planted), thresholds)
    assert len(reasons) == 1 and match in reasons[0]


def test_unset_gates_do_not_fire():
    loose = Thresholds(min_cos=None, max_norm_dev=None)
    assert judge(dataclasses.replace(CLEAN, cos=0.1, norm_ratio=9.0, mismatches=5), loose) == []


def test_weights_must_be_bitwise_by_default():
    assert judge(CLEAN, Thresholds(), weight=True) == ["not bitwise equal"]
    assert judge(CLEAN, Thresholds(exact_weights=False), weight=True) == []
    assert judge(dataclasses.replace(CLEAN, bitwise=True), Thresholds(), weight=True) == []


def test_index_and_packed_tensors():
    ints = TensorMetrics(numel=6, bitwise=False, max_abs=3.0, sets_equal=True)
    assert judge(ints, Thresholds()) == []
    assert judge(dataclasses.replace(ints, sets_equal=False), Thresholds()) == ["index sets differ"]
    assert judge(TensorMetrics(numel=6, bitwise=False), Thresholds()) == ["not bitwise equal (packed dtype)"]


def test_logit_gates():
    logits = LogitMetrics(top1=0.75, topk_overlap=0.9, kl=0.2, k=5)
    assert judge(CLEAN, Thresholds(), logits=logits) == []
    reasons = judge(CLEAN, Thresholds(min_top1=1.0, max_kl=0.1), logits=logits)
    assert reasons == ["top-1 agreement 0.7500 < 1.0", "KL 0.2 > 0.1"]

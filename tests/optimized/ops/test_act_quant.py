"""act_quant: FP8 e4m3 quantization per (token, 128-group) before a GEMM.

Twin: `parity.reference.kernels.act_quant`, which `ref.linear` calls on one request's `[1, s, K]` activations. The op
runs on the flat `[T, K]` tokens of a ragged batch; each token's groups must quantize exactly as in its own request.
"""

import itertools

import pytest
import torch

from parity.optimized.ops import resolve_ops
from parity.reference import kernels

OPS = resolve_ops()

# (scale_fmt, scale_dtype) as ModelArgs derives them: scale_dtype "fp8" -> ("ue8m0", e8m0), "fp32" -> (fmt, fp32)
POLICIES = [
    pytest.param("ue8m0", torch.float8_e8m0fnu, id="ue8m0-e8m0"),
    pytest.param("ue8m0", torch.float32, id="ue8m0-fp32"),
    pytest.param(None, torch.float32, id="none-fp32"),
]
CASES = [
    ((1,), 128),
    ((2,), 256),
    ((5,), 128),
    ((37,), 256),
    ((129,), 128),
    ((1, 2, 5), 256),
    ((37, 1, 63), 128),
    ((2, 5, 1, 3, 1), 256),
]
PARAMS = [pytest.param(*c, id="L{}-K{}".format("_".join(map(str, c[0])), c[1])) for c in CASES]


def cu_of(lengths):
    return tuple(itertools.accumulate(lengths, initial=0))


def bits(t: torch.Tensor) -> torch.Tensor:
    # fp8 / e8m0 tensors compare by their bytes (torch.equal has no float8 kernel on every build)
    return t.view(torch.uint8) if t.element_size() == 1 else t


def activations(t: int, k: int) -> torch.Tensor:
    x = torch.randn(t, k) * torch.logspace(-6, 2, t).unsqueeze(1)  # rows from below the 1e-4 amax floor to large
    if t:
        x[t // 2, : k // 2] = 0.0  # an all-zero group
    return x.to(torch.bfloat16)


def reference_per_sequence(x, cu, fmt, sdtype):
    ys, ss = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        y, s = kernels.act_quant(x[None, a:b], 128, fmt, sdtype)  # the reference's [1, s, K]
        ys.append(y[0])
        ss.append(s[0])
    return torch.cat(ys), torch.cat(ss)


@pytest.mark.parametrize(("fmt", "sdtype"), POLICIES)
@pytest.mark.parametrize(("lengths", "k"), PARAMS)
def test_ragged_matches_reference_per_sequence(lengths, k, fmt, sdtype):
    cu = cu_of(lengths)
    x = activations(cu[-1], k)
    y, s = OPS.act_quant(x, 128, fmt, sdtype)
    ry, rs = reference_per_sequence(x, cu, fmt, sdtype)
    assert y.dtype == torch.float8_e4m3fn and s.dtype == sdtype
    assert y.shape == (cu[-1], k) and s.shape == (cu[-1], k // 128)
    assert torch.equal(bits(y), bits(ry))
    assert torch.equal(bits(s), bits(rs))


def test_rows_do_not_depend_on_batchmates_or_position():
    a = activations(37, 256)
    alone = OPS.act_quant(a, 128, "ue8m0", torch.float8_e8m0fnu)
    for before, after in ((5, 1), (0, 63), (129, 0)):
        batch = torch.cat([activations(before, 256), a, activations(after, 256)])
        y, s = OPS.act_quant(batch, 128, "ue8m0", torch.float8_e8m0fnu)
        assert torch.equal(bits(y[before : before + 37]), bits(alone[0]))
        assert torch.equal(bits(s[before : before + 37]), bits(alone[1]))


def test_planted_bug_unrounded_scales_are_caught():
    # a backend that ignores scale_fmt="ue8m0" (plain amax/448 scales) must fail the comparison above
    cu = cu_of((37, 1, 63))
    x = activations(cu[-1], 256)
    y, _ = OPS.act_quant(x, 128, None, torch.float32)
    ry, _ = reference_per_sequence(x, cu, "ue8m0", torch.float32)
    assert not torch.equal(bits(y), bits(ry))

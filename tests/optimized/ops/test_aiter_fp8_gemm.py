"""fp8_gemm on aiter's gemm_a8w8_blockscale: what test_fp8_gemm.py (which runs the aiter backend against the twin
on its ragged cases and planted bugs) does not cover - the adapter's scale conversion, its caching, the split-K pin
and a NaN-poisoned output. Run under TRITON_INTERPRET=1 on CPU, compiled on CUDA."""

import pytest
import torch

from parity.formats import e8m0_to_float, quantize_fp8_blocks
from parity.optimized.ops import OpsConfig, resolve_ops
from parity.optimized.ops.aiter import loader

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_OK, _WHY = loader.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"aiter backend unavailable: {_WHY}")


@pytest.fixture(scope="module")
def mod():
    resolve_ops(OpsConfig(overrides=(("fp8_gemm", "aiter"),)))
    from parity.optimized.ops.aiter import fp8_gemm

    return fp8_gemm


def operands(m=37, n=192, k=384, seed=3):
    from parity.reference import kernels

    g = torch.Generator().manual_seed(seed)
    w, s = quantize_fp8_blocks(torch.randn(n, k, generator=g) * k**-0.5)  # e8m0 scales
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    xq, xs = kernels.act_quant(x, 128, "ue8m0", torch.float8_e8m0fnu)
    return xq.to(DEV), xs.to(DEV), w.to(DEV), s.to(DEV)


def test_scale_widening_is_exact(mod):
    codes = torch.arange(256, dtype=torch.uint8)
    wide = mod.fp32_scales(codes.view(torch.float8_e8m0fnu))
    finite = codes < 255
    assert wide.dtype == torch.float32 and torch.isnan(wide[~finite]).all()
    assert torch.equal(wide[finite].double(), 2.0 ** (codes[finite].double() - 127))
    fp32 = torch.rand(3, 4) + 0.5
    assert torch.equal(mod.fp32_scales(fp32), fp32)


def test_e8m0_and_fp32_scales_give_the_same_bits(mod):
    xq, xs, w, s = operands()
    with_e8m0 = mod.fp8_gemm(xq, xs, w, s, torch.float8_e8m0fnu)
    with_fp32 = mod.fp8_gemm(xq, e8m0_to_float(xs).contiguous(), w, e8m0_to_float(s).contiguous())
    assert torch.equal(with_e8m0, with_fp32)


def test_weight_scales_are_widened_once_per_tensor_and_version(mod, monkeypatch):
    calls = []
    real = mod.fp32_scales
    monkeypatch.setattr(mod, "fp32_scales", lambda t: calls.append(t.shape) or real(t))
    xq, xs, w, s = operands(m=5)
    s = s.clone()
    first = mod.fp8_gemm(xq, xs, w, s)
    mod.fp8_gemm(xq, xs, w, s)
    weight_calls = [c for c in calls if c == s.shape]
    assert len(weight_calls) == 1, "the weight's scales must be converted once and cached"
    s.view(torch.uint8).add_(1)  # in place: every weight scale doubled, a new version
    assert torch.equal(mod.fp8_gemm(xq, xs, w, s).float(), 2 * first.float())


def test_split_k_stays_pinned_off(mod, monkeypatch):
    # a tuning table asking for split-K (a regrouped fp32 sum) must not change the adapter's order
    from aiter.ops.triton._triton_kernels import gemm_a8w8_blockscale as kernels

    xq, xs, w, s = operands(k=1024)
    plain = mod.fp8_gemm(xq, xs, w, s)
    table = kernels._get_config(xq.shape[0], w.shape[0], xq.shape[1])
    monkeypatch.setattr(kernels, "_get_config", lambda m, n, k: {**table, "NUM_KSPLIT": 4})
    assert mod._config(xq.shape[0], w.shape[0], xq.shape[1])["NUM_KSPLIT"] == 1
    assert torch.equal(mod.fp8_gemm(xq, xs, w, s), plain)


def test_kernel_writes_every_output(mod):
    gemm = loader.load("aiter.ops.triton.gemm_a8w8_blockscale", "gemm_a8w8_blockscale")
    xq, xs, w, s = operands(m=129)
    clean = mod.fp8_gemm(xq, xs, w, s)
    out = torch.full(clean.shape, float("nan"), dtype=torch.bfloat16, device=DEV)  # the kernel's output dtype
    m, k = xq.shape
    gemm(xq, w, mod.fp32_scales(xs), mod.fp32_scales(s), dtype=torch.bfloat16, y=out, config=mod._config(m, 192, k))
    assert not out.isnan().any() and torch.equal(out.to(clean.dtype), clean)

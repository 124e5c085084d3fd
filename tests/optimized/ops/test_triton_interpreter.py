"""The Triton runtime: on CPU the interpreter runs kernels with GPU numerics (`ops/triton/interpreter.py`).

Each test runs a tiny kernel and compares with torch's own casts and fp32 math, which round to nearest even like
the GPU's conversions. On a CUDA machine the same kernels compile and the same assertions hold.
"""

import pytest
import torch

from parity.optimized.ops.triton import runtime

MODE = runtime.setup()  # before the kernels below are decorated

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

DEVICE = "cuda" if MODE == "cuda" else "cpu"


@triton.jit
def _add_bf16(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    y = tl.load(y_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x + y, mask=mask)


@triton.jit
def _cast(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def _reduce_bf16(x_ptr, max_ptr, sum_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    tl.store(max_ptr, tl.max(x, axis=0))
    tl.store(sum_ptr, tl.sum(x.to(tl.float32), axis=0))


def test_setup_picks_the_interpreter_without_a_gpu():
    assert MODE == ("cuda" if torch.cuda.is_available() and not runtime.interpreting() else "interpreter")


def test_bf16_add_is_float_arithmetic():
    x = torch.tensor([1.0, 0.5, -3.25, 1e-3] * 4, dtype=torch.bfloat16, device=DEVICE)
    y = torch.tensor([0.5, 0.25, 1.0, 1.0] * 4, dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty_like(x)
    _add_bf16[(1,)](x, y, out, x.numel(), BLOCK=16)
    assert torch.equal(out, x + y)  # stock interpreter: integer add of the bit patterns (1.0 + 0.5 -> ~8.5e37)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp32_casts_round_to_nearest_even_and_saturate_fp8(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(4000, generator=g) * 100,
        torch.tensor([127.83, 0.001, 400.0, 470.0, 500.0, -1000.0, 1e-9, 0.0, float("nan")]),
    ]).float().to(DEVICE)  # fmt: skip
    out = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast[(1,)](x, out, x.numel(), BLOCK=8192)
    top = torch.finfo(dtype).max
    want = torch.where(x.isnan(), x, x.clamp(-top, top)).to(dtype)
    got, want = out.float(), want.float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])


def test_bf16_dot_accumulates_floats():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g).to(torch.bfloat16).to(DEVICE)
    b = torch.randn(32, 16, generator=g).to(torch.bfloat16).to(DEVICE)
    c = torch.empty(16, 16, dtype=torch.float32, device=DEVICE)
    _dot[(1,)](a, b, c, M=16, N=16, K=32)
    exact = a.double() @ b.double()
    assert (c.double() - exact).abs().max() < 1e-4  # fp32 accumulation of exact bf16 products


def test_bf16_reductions_compare_values():
    x = torch.tensor([-2.0, 3.0, 0.5, -7.5, 1.25, 2.0, -1.0, 6.0], dtype=torch.bfloat16, device=DEVICE)
    mx = torch.empty(1, dtype=torch.bfloat16, device=DEVICE)
    sm = torch.empty(1, dtype=torch.float32, device=DEVICE)
    _reduce_bf16[(1,)](x, mx, sm, BLOCK=8)
    assert float(mx) == 6.0 and float(sm) == float(x.float().sum())


def test_the_patch_is_what_fixes_it(monkeypatch):
    # planted bug: with the stock conversion back in place, a bf16 cast truncates instead of rounding
    if MODE == "cuda":
        pytest.skip("compiled kernels do not go through the interpreter")
    from triton.runtime import interpreter as interp

    from parity.optimized.ops.triton import interpreter as fix

    x = torch.tensor([1.0 + 2**-8 + 2**-10] * 16)  # halfway-plus: rounds up to 1 + 2^-7, truncates to 1.0
    out = torch.empty(16, dtype=torch.bfloat16)
    _cast[(1,)](x, out, 16, BLOCK=16)
    assert torch.equal(out, x.to(torch.bfloat16))
    monkeypatch.setattr(interp, "_convert_float", fix._stock_convert)
    _cast[(1,)](x, out, 16, BLOCK=16)
    assert not torch.equal(out, x.to(torch.bfloat16))


def test_setup_refuses_a_process_that_imported_triton_before_choosing_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels compile; the interpreter is not needed")
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import triton\nfrom parity.optimized.ops.triton import runtime\nruntime.setup()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "TRITON_INTERPRET=1" in run.stderr

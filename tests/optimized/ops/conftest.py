"""Fixtures of the per-op tests (`test_<op>.py`, one per module of `parity.optimized.ops.registry.OP_MODULES`).

Every op test compares a backend's op over a flat ragged batch `[T, ...]` with the op's reference twin run per
sequence at the reference's own shapes. A test module names its op (`OP = "rms_norm"`) and asks for the `impl`
fixture: it is then run once per backend registered for that op (`registry()[OP]`), and `check(impl, got, want)`
judges the result the way the backend's registry entry claims: bitwise, or within its stated tolerance of the
float64 math.
"""

from dataclasses import dataclass

import pytest
import torch

from parity import machine
from parity.checkpoint import build_model
from parity.compare.metrics import compare_tensors
from parity.optimized.ops import Impl, OpsConfig, registry, resolve_ops


@dataclass(frozen=True)
class BackendImpl:
    """One backend's implementation of the module's op, loaded (its backend set up) and callable."""

    op: str
    backend: str
    entry: Impl
    fn: object

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def bitwise(self) -> bool:
        return self.entry.bitwise


def pytest_generate_tests(metafunc):
    if "impl" in metafunc.fixturenames:
        op = metafunc.module.OP
        metafunc.parametrize("impl", list(registry()[op]), indirect=True)


@pytest.fixture
def impl(request) -> BackendImpl:
    op, backend = request.module.OP, request.param
    if backend == "aiter":  # a third-party package: absent on a machine without it, which is not a failure here
        from parity.optimized.ops.aiter import loader

        ok, why = loader.available()
        if not ok:
            pytest.skip(f"aiter backend unavailable: {why}")
    ops = resolve_ops(OpsConfig(overrides=((op, backend),)))  # runs the backend's setup (Triton: interpreter)
    return BackendImpl(op, backend, registry()[op][backend], getattr(ops, op))


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 size of one unit in the last place of `dtype` at |x| (the step to the next value up)."""
    mag = x.abs().to(dtype)
    return (torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag).double()


def check(impl: BackendImpl, got: torch.Tensor, want: torch.Tensor, golden: torch.Tensor | None = None, ulps=1.0):
    """Judge a backend's output `got` against the reference twin's `want`, as the backend's entry claims.

    Bitwise backends: `torch.equal` (dtype and shape included). Others: same dtype and shape, NaN/Inf at the same
    places, and every element no further from the float64 math (`golden`; default `want` itself) than the twin
    is, plus `ulps` units in the last place of the output dtype: a kernel may round differently than the twin,
    but never by more than its output format's rounding step. The reason is the entry's `tolerance`."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    if impl.bitwise:
        assert torch.equal(got, want), f"{impl.op}/{impl.backend} claims bitwise equality with its twin"
        return
    where = f"{impl.op}/{impl.backend}"
    a, b = want.double(), got.double()
    assert torch.equal(a.isnan(), b.isnan()), f"{where}: NaN at other places than the twin's"
    inf = a.isinf() | b.isinf()
    assert torch.equal(a[inf], b[inf]), f"{where}: Inf at other places than the twin's"
    g = a if golden is None else golden.double()
    finite = a.isfinite()
    excess = torch.where(finite, (b - g).abs() - (a - g).abs() - ulps * _ulp(g, got.dtype), 0.0)
    bad = int((excess > 0).sum())
    if bad:
        m = compare_tensors(want, got)
        raise AssertionError(
            f"{where}: {bad} of {got.numel()} elements beyond the twin's error + {ulps} ulp of the float64 math (worst "
            f"by {float(excess.max()):.3g}; cos {m.cos}, max|diff| {m.max_abs}); tolerance: {impl.entry.tolerance}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


@pytest.fixture(scope="module")
def ref_model(tiny_ckpt):
    """The reference Transformer on the session's synthetic tiny checkpoint (what `make_model()` builds), once per
    module: the op tests only read its parameters and never run or mutate it."""
    model, _ = build_model(tiny_ckpt)
    return model


# the devices a machine-dependent property is measured on: the CPU always, CUDA where present
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def skip_unless_batch_changes_bits(per_request: torch.Tensor, whole_batch: torch.Tensor, what: str) -> None:
    """Skip unless this machine's kernels give other bits for the whole batch than for each request alone.

    The segmenting ops exist because torch's kernels round by shape (GEMM blocking by row count, a reduction's
    vectorized head and scalar tail). Whether a given batch shows it depends on the CPU and on torch's dispatch
    level (`ATEN_CPU_CAPABILITY`), so a planted "one segment for the batch" bug is only visible where the reference
    twin itself, run over the whole batch as one request, differs from the per-request runs: measure that first."""
    if torch.equal(per_request, whole_batch):
        pytest.skip(
            f"{what}: on {machine.summary()} the reference twin gives the same bits for the whole batch as for each "
            "request alone, so merging the segments is invisible on this machine"
        )

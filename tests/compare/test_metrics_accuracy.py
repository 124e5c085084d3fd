"""The fused one-pass metrics against a plain float64 implementation written here, on adversarial inputs.

The reference sums with `math.fsum` (exactly rounded), so its error is a few units of roundoff u = 2**-53; the fused
pass sums float64 products in tiles, whose error is at most gamma = n u / (1 - n u) times the sum of |terms| (the
bound of any float64 summation order, n = element count). Each metric's tolerance below follows from that:
- cos: |d| <= 2 gamma + 8 u (|Σxy| <= |x| |y|, each norm off by gamma / 2 relatively);
- norm_ratio, rel_l2: relative gamma + 8 u; rel_diff (Σe² / Σ(x² + y²) here, 1 - 2Σxy / Σ(x² + y²) in the
  reference): relative gamma + 8 u plus 8 u absolute (the reference's own last subtraction);
- max_abs, max_rel, mismatches, NaN/Inf counts: exact (the same correctly rounded operations on the same elements).
The tile size is shrunk to a few elements (and the pending-row batch to 3 rows) so that rows split over tiles,
tiles of whole rows, ragged last tiles and several row batches are all exercised on small tensors. Every test runs
twice: with the compiled tile loop (parity/compare/tile_loop.py, taken for CPU pairs of two bf16, fp16 or fp32
tiles) and with the torch form it replaces there (float64 pairs and mixed dtypes take the torch form in both runs).
"""

import math

import pytest
import torch

from parity.compare import compare_tensors, fused

U = 2.0**-53


@pytest.fixture(autouse=True, params=["compiled", "torch"])
def form(request, monkeypatch):
    """Which tile arithmetic runs: the compiled loop where it applies, or the torch form everywhere."""
    if request.param == "compiled":
        assert fused._tile_loops() is not None, "numba is a dependency: the compiled tile loop must be testable here"
    else:
        monkeypatch.setattr(fused, "compiled_loop", lambda a, b: None)
    return request.param


@pytest.fixture(params=[5, 64, 1 << 16], ids=lambda t: f"tile{t}")
def tile(request, monkeypatch):
    monkeypatch.setattr(fused, "TILE", request.param)
    monkeypatch.setattr(fused, "COMPILED_TILE", request.param)
    monkeypatch.setattr(fused, "PENDING", 3 if request.param < 100 else fused.PENDING)  # rows judged in batches
    return request.param


def _cos(xy, xx, yy, equal):
    if equal:
        return 1.0
    nx, ny = math.sqrt(xx), math.sqrt(yy)
    if nx == 0 or ny == 0:
        return 1.0 if nx == ny else 0.0
    return max(-1.0, min(1.0, xy / (nx * ny)))


def _sums(x: list[float], y: list[float]):
    return (
        math.fsum(p * q for p, q in zip(x, y, strict=True)),
        math.fsum(p * p for p in x),
        math.fsum(q * q for q in y),
        math.fsum((p - q) ** 2 for p, q in zip(x, y, strict=True)),
    )


def _slice_cos(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-row cosines of `[k, m]` float64 rows (non-finite positions already zeroed)."""
    out = []
    for rx, ry in zip(x.tolist(), y.tolist(), strict=True):
        xy, xx, yy, _ = _sums(rx, ry)
        out.append(_cos(xy, xx, yy, rx == ry))
    return out


def reference(a: torch.Tensor, b: torch.Tensor, atol: float | None, token_dims: int) -> dict:
    x, y = a.double(), b.double()
    fin = x.isfinite() & y.isfinite()
    fx, fy = x[fin].tolist(), y[fin].tolist()
    xy, xx, yy, ee = _sums(fx, fy)
    err = [abs(p - q) for p, q in zip(fx, fy, strict=True)]
    rel = [(0.0 if e == 0 else math.inf) if p == 0 else e / abs(p) for p, e in zip(fx, err, strict=True)]
    out = {
        "cos": _cos(xy, xx, yy, fx == fy),
        "max_abs": max(err, default=0.0),
        "max_rel": max(rel, default=0.0),
        "rel_l2": (0.0 if ee == 0 else math.inf) if xx == 0 else math.sqrt(ee) / math.sqrt(xx),
        "norm_ratio": (1.0 if yy == 0 else math.inf) if xx == 0 else math.sqrt(yy) / math.sqrt(xx),
        "rel_diff": 0.0 if xx + yy == 0 else max(0.0, 1.0 - 2.0 * xy / (xx + yy)),
        "nan": (int(x.isnan().sum()), int(y.isnan().sum())),
        "inf": (int(x.isinf().sum()), int(y.isinf().sum())),
    }
    if atol is not None:
        close = ((x - y).abs() <= atol) | (x == y) | (x.isnan() & y.isnan())
        out["mismatches"] = int((~close).sum())
    zx, zy = x.where(fin, 0.0), y.where(fin, 0.0)
    if x.ndim > token_dims:
        out["token"] = _slice_cos(zx.flatten(0, token_dims - 1).flatten(1), zy.flatten(0, token_dims - 1).flatten(1))
        out["channel"] = _slice_cos(zx.movedim(-1, 0).flatten(1), zy.movedim(-1, 0).flatten(1))
    if x.ndim >= token_dims + 2:
        out["head"] = _slice_cos(zx.movedim(-2, 0).flatten(1), zy.movedim(-2, 0).flatten(1))
    return out


def check(a: torch.Tensor, b: torch.Tensor, *, atol: float | None = None, token_dims: int = 1) -> None:
    m = compare_tensors(a, b, atol=atol, token_dims=token_dims)
    ref = reference(a, b, atol, token_dims)
    gamma = a.numel() * U / (1 - a.numel() * U)
    assert (m.nan_a, m.nan_b) == ref["nan"] and (m.inf_a, m.inf_b) == ref["inf"]
    assert m.max_abs == ref["max_abs"] and m.max_rel == ref["max_rel"]
    if atol is not None:
        assert m.mismatches == ref["mismatches"]
    assert abs(m.cos - ref["cos"]) <= 2 * gamma + 8 * U, (m.cos, ref["cos"])
    for k in ("norm_ratio", "rel_l2"):
        got, want = getattr(m, k), ref[k]
        assert got == want or abs(got - want) <= (gamma + 8 * U) * abs(want), (k, got, want)
    assert abs(m.rel_diff - ref["rel_diff"]) <= (gamma + 8 * U) * ref["rel_diff"] + 8 * U
    if m.bitwise or m.cos == 1.0 and m.max_abs == 0.0 and not (m.nan_a or m.nan_b or m.inf_a or m.inf_b):
        return
    for key, worst in (("token", m.worst_token), ("channel", m.worst_channel), ("head", m.worst_head)):
        if key not in ref:
            assert worst is None, key
            continue
        cos = ref[key]
        index = worst[0] if isinstance(worst[0], int) else _flat(worst[0], a.shape[:token_dims])
        # a near-tie may pick another slice: the one picked must be a minimum within the cos tolerance
        assert abs(worst[1] - min(cos)) <= 2 * gamma + 8 * U and cos[index] <= min(cos) + 4 * gamma + 16 * U, key


def _flat(index: tuple[int, ...], lead) -> int:
    return int(torch.tensor(index) @ torch.tensor([math.prod(lead[i + 1 :]) for i in range(len(lead))]))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cancellation_near_equal_pairs(tile):
    g = _gen(1)
    x = torch.randn(37, 11, generator=g, dtype=torch.float64)
    for scale in (1e-3, 1e-9, 1e-15):
        check(x, x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64), atol=1e-12)
    # one ulp apart in a single element: cos a hair below 1, rel_diff at the bottom of float64
    y = x.clone()
    y[3, 4] = math.nextafter(y[3, 4].item(), math.inf)
    check(x, y)
    # the dtypes the compiled loop takes: one ulp apart in one element, and everywhere
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = x.to(dtype)
        b = a.clone()
        b[3, 4] = torch.nextafter(b[3, 4], torch.tensor(math.inf, dtype=dtype))
        check(a, b, atol=0.0)
        check(a, torch.nextafter(a, torch.full_like(a, math.inf)), atol=1e-3)


def test_ill_conditioned_dot_products(tile):
    # Σxy = 2 exactly but a naive left-to-right float64 sum loses it entirely; the bound is on |x| |y|
    x = torch.tensor([[1e16, 1.0, -1e16, 1.0], [3.0, -3.0, 1e-150, 7.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 1e150, 7.0]], dtype=torch.float64)
    check(x, y)
    check(-x, y)


def test_huge_dynamic_range(tile):
    g = _gen(2)
    exp = torch.randint(-150, 150, (9, 4, 7), generator=g).double()
    x = torch.randn(9, 4, 7, generator=g, dtype=torch.float64) * 10.0**exp
    y = x * (1 + 1e-6 * torch.randn(x.shape, generator=g, dtype=torch.float64))
    check(x, y, atol=1e-100)
    check(x, y.flip(0))
    bf = (torch.randn(64, 33, generator=g) * 2.0 ** torch.randint(-120, 120, (64, 33), generator=g)).bfloat16()
    check(bf, (bf.float() * 1.01).bfloat16())
    # float32 from subnormals to near its largest: products span 1e-90 to 1e76, exact in float64
    f = torch.randn(50, 21, generator=g) * 2.0 ** torch.randint(-149, 126, (50, 21), generator=g).float()
    check(f, f * (1 + 1e-4 * torch.randn(f.shape, generator=g)), atol=1e-30)
    check(f, f.flip(1))
    h = (torch.randn(40, 17, generator=g) * 2.0 ** torch.randint(-24, 15, (40, 17), generator=g)).half()
    check(h, (h.float() * 0.999).half(), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["first", "last", "middle", "tile-edge", "same-spot", "everywhere"])
def test_nan_inf_positions(tile, where, dtype):
    g = _gen(3)
    x = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)
    y = x + 1e-3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    fx, fy = x.view(-1), y.view(-1)
    spots = {"first": [0], "last": [89], "middle": [44], "tile-edge": [4, 5, 63, 64], "same-spot": [17]}
    if where == "everywhere":
        fx[::2], fy[1::3] = math.nan, -math.inf
    elif where == "same-spot":
        fx[17] = fy[17] = math.inf
        fx[30] = fy[30] = math.nan
    else:
        for i in spots[where]:
            fx[i], fy[(i + 1) % 90] = math.nan, math.inf
    check(x, y, atol=1e-4)


def test_all_equal_and_zeros(tile):
    x = torch.randn(10, 7, generator=_gen(4)).bfloat16()
    check(x, x.clone())
    check(x, x.float())  # equal values, not bitwise: exact short-circuit values
    z = torch.zeros(10, 7)
    check(z, z.clone())
    check(z, x.float())
    check(x.float(), z)
    half = x.float().clone()
    half[:5] = 0
    check(half, x.float())
    # zeros against non-zeros in the compiled loop's dtypes: e / 0 is an infinite max_rel, 0 / 0 no difference
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        zd, xd = z.to(dtype), x.to(dtype)
        check(zd, xd, atol=0.1)
        check(xd, zd)
        signed = zd.clone()
        signed[::2] = -0.0
        check(signed, zd)  # -0 and +0 are equal values


@pytest.mark.parametrize("shape", [(1,), (2,), (1, 1), (3, 1, 1), (0, 4)], ids=str)
def test_tiny_records(tile, shape):
    g = _gen(5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    check(x, x + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "token_dims"),
    [((131,), 1), ((3, 67), 1), ((7, 3, 13), 1), ((2, 5, 3, 7), 2), ((2, 3, 2, 5, 3), 1), ((1, 200), 1)],
    ids=str,
)
def test_records_not_a_multiple_of_the_tile(tile, shape, token_dims):
    g = _gen(6)
    x = torch.randn(shape, generator=g).bfloat16()
    y = (x.float() + 0.05 * torch.randn(shape, generator=g)).bfloat16()
    y.view(-1)[-1] = 3.0  # a planted outlier in the very last element (the ragged last tile)
    check(x, y, atol=0.01, token_dims=token_dims)


def test_mixed_and_narrow_dtypes(tile):
    g = _gen(7)
    x = torch.randn(12, 9, generator=g)
    check(x.to(torch.float8_e4m3fn), (x * 1.1).to(torch.float8_e4m3fn))
    check(x.half(), x.bfloat16())
    check(x, x.double() + 1e-9)


def test_the_compiled_loop_is_what_runs_for_its_dtypes(form, monkeypatch):
    """Bf16, fp16 and fp32 CPU pairs go through the compiled loop (finite tiles) and nothing else does; a tile with
    a NaN or Inf takes the torch form's masked path."""
    ran = []
    real = fused.FusedPass._add_compiled

    def spy(self, loop, a, *args):
        ran.append(a.dtype)
        return real(self, loop, a, *args)

    monkeypatch.setattr(fused.FusedPass, "_add_compiled", spy)
    x = torch.randn(4, 6, generator=_gen(8))
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        compare_tensors(x.to(dtype), (x * 1.01).to(dtype))
    compare_tensors(x.bfloat16(), x.half())  # mixed dtypes: the torch form
    y = x.clone()
    y[1, 2] = math.nan
    compare_tensors(x, y)  # a non-finite tile: the torch form
    want = [torch.bfloat16, torch.float16, torch.float32] if form == "compiled" else []
    assert ran == want

"""Pass/fail thresholds and the judgement of one pair's metrics against them.

Defaults suit bf16 activations: cos >= 0.999 catches direction errors, and the norm ratio within 1 % catches what
cos is blind to (a dropped or doubled scale factor). `atol` is optional: absolute error depends on each tensor's
range, so it is reported always and gated only on request. Weights are expected bitwise equal (both sides should
have loaded the same checkpoint), index tensors must hold the same sets.

NaN/Inf are never equal to anything: a pair holding them passes only when both sides hold them at the same
positions and side a (the reference) holds no NaN. A NaN in the reference is a failure of the run, not agreement:
two all-NaN tensors are bitwise equal yet prove nothing. -Inf at the same positions is legitimate (the reference's
compressor keeps -inf scores in its state).
"""

import math
from dataclasses import dataclass, fields

import torch

from parity.compare.metrics import LogitMetrics, TensorMetrics
from parity.dump.format import to_float64
from parity.errors import ParityError

# (lowest, highest) allowed value of each numeric threshold; every one must be finite (a NaN or Inf threshold
# would disable its gate without a word)
_RANGES = {
    "min_cos": (-1.0, 1.0),
    "max_norm_dev": (0.0, math.inf),
    "max_rel_diff": (0.0, math.inf),
    "atol": (0.0, math.inf),
    "rtol": (0.0, math.inf),
    "min_token_cos": (-1.0, 1.0),
    "min_top1": (0.0, 1.0),
    "max_kl": (0.0, math.inf),
}


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A pair passes when every set threshold holds.

    Args:
        min_cos (float, Optional):
            Lowest whole-tensor cosine. Default: `0.999`.
        max_norm_dev (float, Optional):
            Largest `|norm(b) / norm(a) - 1|`. Default: `0.01`.
        max_rel_diff (float, Optional):
            Largest DeepGEMM `1 - 2Σab / Σ(a² + b²)`. Default: `None` (not gated).
        atol (float, Optional):
            With `rtol`: no element may have `|a - b| > atol + rtol * |a|`. Default: `None` (not gated).
        rtol (float):
            Default: `0.0`.
        min_token_cos (float, Optional):
            Lowest per-token cosine, against defects diluted in a whole-tensor cosine. Default: `None`.
        exact (bool):
            Require bitwise equality for every record. Default: `False`.
        exact_weights (bool):
            Require bitwise equality for weight records. Default: `True`.
        min_top1 (float, Optional):
            Lowest argmax agreement for logit records. Default: `None`.
        max_kl (float, Optional):
            Largest mean KL(a || b) for logit records. Default: `None`.
        allow_dtype_change (bool):
            Measure pairs whose dtypes differ (a bf16 candidate against an fp32 reference) instead of failing
            them. Default: `False`.
    """

    min_cos: float | None = 0.999
    max_norm_dev: float | None = 0.01
    max_rel_diff: float | None = None
    atol: float | None = None
    rtol: float = 0.0
    min_token_cos: float | None = None
    exact: bool = False
    exact_weights: bool = True
    min_top1: float | None = None
    max_kl: float | None = None
    allow_dtype_change: bool = False

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in _RANGES or value is None:
                continue
            low, high = _RANGES[f.name]
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not low <= value <= high:
                bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
                raise ParityError(
                    f"threshold {f.name} (--{f.name.replace('_', '-')}): expected a finite number {bound}, "
                    f"got {value!r}"
                )


def same_non_finite_positions(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether NaN, +Inf and -Inf sit at the same positions of two equally shaped tensors (counts can agree while
    positions do not). Packed dtypes hold no NaN/Inf."""
    x, y = to_float64(a), to_float64(b)
    if x is None or y is None:
        return True
    inf = math.inf
    return all(torch.equal(f(x), f(y)) for f in (torch.isnan, lambda t: t == inf, lambda t: t == -inf))


def non_finite_reasons(m: TensorMetrics, same_positions: bool = True) -> list[str]:
    """Why the pair's NaN/Inf make it fail (module docstring), whatever its other metrics say."""
    reasons = []
    if m.nan_a:
        reasons.append(f"a holds {m.nan_a} NaN of {m.numel} elements: the reference itself produced NaN")
    if (m.nan_a, m.inf_a) != (m.nan_b, m.inf_b):
        reasons.append(f"NaN/Inf {m.nan_b}/{m.inf_b} vs {m.nan_a}/{m.inf_a} in a")
    elif not same_positions:
        reasons.append(f"NaN/Inf {m.nan_b}/{m.inf_b} on both sides but at different positions")
    return reasons


def judge(
    m: TensorMetrics,
    t: Thresholds,
    *,
    weight: bool = False,
    logits: LogitMetrics | None = None,
    same_positions: bool = True,
) -> list[str]:
    """The reasons the pair fails (empty: it passes). `same_positions`: whether the NaN/Inf of both sides sit at the
    same positions (`same_non_finite_positions`; the metrics only hold counts)."""
    reasons = non_finite_reasons(m, same_positions)
    if m.bitwise:
        return reasons
    if t.exact or (weight and t.exact_weights):
        return reasons + ["not bitwise equal"]
    if m.sets_equal is not None:
        return reasons + ([] if m.sets_equal else ["index sets differ"])
    if m.cos is None and m.norm_ratio is None:
        return reasons + ["not bitwise equal (packed dtype)"]
    norm_dev = None if m.norm_ratio is None else abs(m.norm_ratio - 1)
    token_cos = None if m.worst_token is None else m.worst_token[1]
    # (value, threshold, whether the threshold is a floor, message)
    checks = [
        (m.cos, t.min_cos, True, "cos {v:.6f} < {th}"),
        (norm_dev, t.max_norm_dev, False, "norm ratio off by {v:.4g} > {th}"),
        (m.rel_diff, t.max_rel_diff, False, "rel_diff {v:.3g} > {th}"),
        (token_cos, t.min_token_cos, True, "token cos {v:.6f} < {th}"),
    ]
    if logits is not None:
        checks += [
            (logits.top1, t.min_top1, True, "top-1 agreement {v:.4f} < {th}"),
            (logits.kl, t.max_kl, False, "KL {v:.3g} > {th}"),
        ]
    for v, th, floor, msg in checks:
        if th is not None and v is not None and ((v < th if floor else v > th) or math.isnan(v)):
            reasons.append(msg.format(v=v, th=th))
    if t.atol is not None and m.mismatches:
        reasons.append(f"{m.mismatches} elements beyond atol {t.atol} + rtol {t.rtol} * |a|")
    return reasons

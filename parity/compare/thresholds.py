"""The noise model: how far each site may legitimately move, with where each number came from.

A threshold bounds one row's relative error at one (site, field, phase) of a teacher-forced run (`verdict`). It
comes from a calibration (`parity calibrate`: the largest error measured over clean variations of a case, times
`margin`, never below the floor of the field's dtype) or, where a case has none, from the defaults below, each
stated with its reason. A decode-exact case allows nothing: every row must be bitwise equal.

Floors, per stored dtype: a bf16 row that differs from the reference in one element by one unit in the last place
has a relative error near 2^-8 * |x_i| / |row|; 1e-3 admits a few such last-bit differences per row and nothing
larger. fp32 fields (mHC post/comb, routing weights, compressor internals) carry no bf16 rounding: 1e-6 admits
fp32 last-bit differences of a reordered reduction. Flips (expert or indexer ids chosen differently) are allowed
on up to `flip_floor` of rows: near-ties between equal bf16 scores reorder top-k legitimately; a routing bug flips
most rows.

File format (JSON, written by `parity calibrate`): `{"schema": 1, "provenance": {...}, "margin": m,
"golden_factor": f, "errors": {"<site template>|<field>|<phase>": measured max, ...}, "flips": {...}}`; the
thresholds are derived on load, so a file records measurements, not policy.
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from parity.errors import ParityError
from parity.io import atomic_write_json, read_json

SCHEMA = 1
BF16_FLOOR = 1e-3
FP32_FLOOR = 1e-6
FLIP_FLOOR = 0.02
MARGIN = 4.0
GOLDEN_FACTOR = 4.0
# fields stored in fp32 (everything else a site holds is bf16): the mHC mixers and the routing weights
FP32_FIELDS = {("mix", "out.1"), ("mix", "out.2"), ("choice", "out.0")}
# uncalibrated defaults for float fields of non-exact cases (relative L2 per row): the largest own errors measured on
# the tiny model's clean batched runs (docs/verdict.md: bf16 sites up to ~0.03, fp32 mixers and routing weights up
# to ~5e-7), with headroom; fp32 fields by their own default
DEFAULTS = {"stream": 0.02, "mix": 0.02, "act": 0.05, "entry": 0.02, "logits": 0.02, "choice": 0.02}
FP32_DEFAULT = 1e-5
# the source name of the defaults when non-bitwise kernels are selected (`parity.run.noise_model` names them after
# it; the report's noise-mismatch line recognizes it)
NON_BITWISE_DEFAULTS = "defaults (non-bitwise ops selected: "


def _key(template: str, field_name: str, phase: str) -> str:
    return f"{template}|{field_name}|{phase}"


@dataclass
class NoiseModel:
    """Thresholds per (site template, field, phase); `exact` for decode-exact cases (bitwise everywhere)."""

    exact: bool = False
    errors: dict[str, float] = field(default_factory=dict)  # measured maxima
    flips: dict[str, float] = field(default_factory=dict)  # measured flip fractions
    margin: float = MARGIN
    golden_factor: float = GOLDEN_FACTOR
    provenance: dict = field(default_factory=dict)
    source: str = "defaults"
    loosen: float = 1.0  # every threshold times this (>= 1): the selftest's proof that a loose gate lets bugs through

    def __post_init__(self):
        for name in ("margin", "golden_factor", "loosen"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 1:
                raise ParityError(f"noise model {self.source}: {name} must be a finite number >= 1, got {v!r}")
        for table in (self.errors, self.flips):
            for k, v in table.items():
                if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                    raise ParityError(f"noise model {self.source}: {k} must be a finite number >= 0, got {v!r}")

    @staticmethod
    def floor(kind: str, field_name: str) -> float:
        return FP32_FLOOR if (kind, field_name) in FP32_FIELDS else BF16_FLOOR

    def threshold(self, template: str, field_name: str, phase: str, kind: str) -> tuple[float, str]:
        """(threshold, where it came from) for a float field."""
        value, source = self._threshold(template, field_name, phase, kind)
        if self.loosen != 1:
            return value * self.loosen, f"{source}, loosened x{self.loosen:g}"
        return value, source

    def _threshold(self, template: str, field_name: str, phase: str, kind: str) -> tuple[float, str]:
        if self.exact:
            return 0.0, "decode-exact: bitwise"
        floor = self.floor(kind, field_name)
        measured = self.errors.get(_key(template, field_name, phase))
        if measured is not None:
            return max(floor, measured * self.margin), f"calibrated ({self.source}): {measured:.3g} x {self.margin}"
        if phase == "prefill":
            # a request's first chunk runs the reference's own prefill shapes: no batching noise to allow
            return floor, "default for prefill rows: the dtype floor (uncalibrated)"
        if (kind, field_name) in FP32_FIELDS:
            return max(floor, FP32_DEFAULT), f"default for fp32 fields of {kind} sites (uncalibrated)"
        return max(floor, DEFAULTS.get(kind, BF16_FLOOR)), f"default for {kind} sites (uncalibrated)"

    def flip_threshold(self, template: str, field_name: str, phase: str) -> float:
        if self.exact:
            return 0.0
        measured = self.flips.get(_key(template, field_name, phase))
        limit = max(FLIP_FLOOR, measured * self.margin) if measured is not None else FLIP_FLOOR
        return limit * self.loosen

    def loosened(self, factor: float) -> "NoiseModel":
        """Every threshold and the golden factor times `factor`."""
        return replace(self, loosen=self.loosen * factor, golden_factor=self.golden_factor * factor,
                       source=f"{self.source} loosened x{factor:g}")  # fmt: skip

    # serialization
    @classmethod
    def load(cls, path: str | Path) -> "NoiseModel":
        path = Path(path)
        data = read_json(path, f"{path}: no such calibration file", f"{path}: not a readable calibration JSON file")
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ParityError(f"{path}: expected a calibration object with schema {SCHEMA}")
        for name in ("errors", "flips", "provenance"):
            if not isinstance(data.get(name, {}), dict):
                raise ParityError(f"{path}: field {name!r} must be an object")
        # a NaN or a string here would switch that site's gate off silently: every number is checked
        for name in ("errors", "flips"):
            for key, value in data.get(name, {}).items():
                _check_number(path, f"{name}[{key!r}]", value, 0.0, math.inf)
        for name, default, low in (("margin", MARGIN, 1.0), ("golden_factor", GOLDEN_FACTOR, 1.0)):
            _check_number(path, name, data.get(name, default), low, math.inf)
        return cls(
            exact=False,
            errors=data.get("errors", {}),
            flips=data.get("flips", {}),
            margin=data.get("margin", MARGIN),
            golden_factor=data.get("golden_factor", GOLDEN_FACTOR),
            provenance=data.get("provenance", {}),
            source=str(path),
        )

    def save(self, path: str | Path) -> Path:
        data = {
            "schema": SCHEMA,
            "provenance": self.provenance,
            "margin": self.margin,
            "golden_factor": self.golden_factor,
            "errors": dict(sorted(self.errors.items())),
            "flips": dict(sorted(self.flips.items())),
        }
        return atomic_write_json(Path(path), data)


def _check_number(path: Path, field: str, value, low: float, high: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not low <= value < high:
        raise ParityError(f"{path}: field {field}: expected a finite number >= {low:g}, got {value!r}")

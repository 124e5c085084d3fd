"""The verdict of an engine-vs-reference run: every site's own error, row by row, judged against calibrated noise
and against the float64 golden; the first failure in execution order names the layer, sub-module, phase, step,
request and position.

Inputs are dumps (in memory for `parity run`, or dirs): the reference's, a candidate's (the optimized model
teacher-forced at every site, so each site shows its own error; or chained, or a hybrid), optionally the golden's
(the reference with float64 kernels, forced the same way). Rows line up by (request, position) (`compare.rows`),
so a candidate's step record is compared with the reference's rows laid out the same way.

Per row and field (a site's tensors): the relative L2 error `|cand - ref| / |ref|` (float fields), or the number
of ids that differ as sets (expert ids, indexer top-k; a top-k reorder of equal scores is no difference). A float
field fails where a row's error exceeds the noise threshold of its (site, field, phase) AND, where a golden exists
and the reference is not bit-equal to it, the candidate is further from the golden than `golden_factor` times the
reference is, or than the stored dtype's unit roundoff where the reference equals the golden (the two distances,
over the record's failing rows, are reported): a kernel that rounds differently from the reference but is no less
accurate passes; a bug does not. Routing weights are compared on the rows whose
expert sets agree; rows whose sets differ are flips, counted against their own threshold and reported with the
score margin (routing or indexer) where the caller supplies it.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from parity.compare import sites
from parity.compare.loader import Dump
from parity.compare.rows import Key, RowStore, calls
from parity.compare.thresholds import NoiseModel

PHASES = ("prefill", "chunk", "decode", "mtp")


@dataclass(frozen=True)
class RequestLayout:
    """What decides a row's phase: the prompt length and the engine's first prefill chunk of one request."""

    prompt_len: int
    first_chunk: int


def row_phase(layout: dict[str, RequestLayout], sp: sites.SitePath, key: Key) -> str:
    """prefill (the first chunk), chunk (later prompt chunks), decode (generated tokens), mtp (MTP blocks)."""
    if sp.block is not None and sp.block.startswith("mtp"):
        return "mtp"
    req = layout[key[0]]
    if key[1] < req.first_chunk:
        return "prefill"
    return "chunk" if key[1] < req.prompt_len else "decode"


@dataclass
class SiteResult:
    """One (site path, field, phase): the worst row over every record of the run."""

    path: str
    field: str
    phase: str
    kind: str
    submodule: str
    layer: int | None
    order: tuple
    rows: int = 0
    compared: int = 0
    bitwise: bool = True
    max_err: float = 0.0
    worst: tuple | None = None  # (step, request, position) of the worst row
    threshold: float | None = None
    threshold_source: str = ""
    flips: int = 0
    ties: int = 0  # rows that chose other ids among exactly tied reference scores: not flips
    flip_threshold: float | None = None
    flip_margins: list[float] = field(default_factory=list)
    golden_ref: float | None = None  # relative distance of the reference to the golden over the failing rows
    golden_cand: float | None = None  # the candidate's
    failures: int = 0
    first_failure: tuple | None = None  # (step, request, position) of the earliest failing row
    reasons: list[str] = field(default_factory=list)
    # rows over the dtype floor but within the noise threshold: judged together against the golden (see floats)
    suspects: int = 0
    suspect_first: tuple | None = None
    suspect_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0], repr=False)  # |c-g|^2, |w-g|^2, |g|^2
    suspect_eps: float = 0.0  # the unit roundoff of the field's dtype (rows over the floor set it)
    inner_eps: float = 0.0  # the unit roundoff of the site's own inner rounding, where coarser (`Site.inner_dtype`)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def to_row(self) -> dict:
        return {
            "site": self.path,
            "field": self.field,
            "phase": self.phase,
            "submodule": self.submodule,
            "layer": self.layer,
            "rows": self.rows,
            "compared": self.compared,
            "bitwise": self.bitwise,
            "max_err": self.max_err,
            "worst": self.worst,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "flips": self.flips,
            "ties": self.ties,
            "flip_threshold": self.flip_threshold,
            # the reference's top-k boundary gap of each flipped row (near-tie vs real), the smallest first
            "flip_margins": sorted(self.flip_margins)[:32],
            "golden_ref": self.golden_ref,
            "golden_cand": self.golden_cand,
            "failures": self.failures,
            "first_failure": self.first_failure,
            "passed": self.passed,
            "reasons": "; ".join(self.reasons),
        }


@dataclass
class Verdict:
    results: list[SiteResult]
    first: SiteResult | None
    reference_nan: str | None = None  # the first site where the reference itself produced NaN/Inf
    missing_rows: int = 0  # candidate rows the reference had no value for (never silently passed: reported)

    @property
    def passed(self) -> bool:
        return self.first is None and self.reference_nan is None and self.missing_rows == 0

    def location(self) -> str:
        if self.reference_nan is not None:
            return f"the reference produced NaN/Inf at {self.reference_nan}"
        if self.first is None:
            if self.missing_rows:  # a row judged against nothing is never a pass
                return f"{self.missing_rows} candidate rows have no reference value: the runs are not aligned"
            return ""
        r = self.first
        step, req, pos = r.first_failure
        where = f"layer {r.layer}" if r.layer is not None else "model"
        return (
            f"{where} {r.submodule} ({r.path}:{r.field}), phase {r.phase}, step {step}, request {req}, position {pos}: "
            f"{'; '.join(r.reasons)}"
        )


def judge_run(
    reference: Dump,
    candidate: Dump,
    layout: dict[str, RequestLayout],
    n_layers: int,
    noise: NoiseModel,
    *,
    golden: Dump | None = None,
    margin: Callable[[str, Key], float | None] | None = None,
    tie: Callable[[str, Key, torch.Tensor, torch.Tensor], bool] | None = None,
    reference_rows: RowStore | None = None,
) -> Verdict:
    """Compare every tap record of `candidate` with `reference` row by row; see the module docstring.
    `margin(site path, key)` gives the score margin of a flipped row (routing or indexer), if the caller can compute it;
    `tie(site path, key, candidate ids, reference ids)` says a flipped row chose among exactly tied reference scores
    (counted as a tie, not a flip; parity.capture.margins); `reference_rows`, the reference's rows if the caller
    already has them (else they are read from `reference`)."""
    rows = reference_rows if reference_rows is not None else RowStore.from_dump(reference, n_layers)
    j = _Judge(rows, layout, n_layers, noise, margin, tie)
    j.gold = RowStore.from_dump(golden, n_layers) if golden is not None else None
    for call in calls(candidate, n_layers):
        j.call(call, candidate)
    ordered = sorted(j.results.values(), key=lambda r: (r.order, PHASES.index(r.phase), r.field))
    for r in ordered:
        _judge(r, noise.golden_factor)
    failing = [r for r in ordered if not r.passed]
    first = min(failing, key=lambda r: (r.order, r.first_failure, r.field)) if failing else None
    return Verdict(ordered, first, j.reference_nan, j.missing)


class _Judge:
    def __init__(self, ref: RowStore, layout, n_layers: int, noise: NoiseModel, margin, tie=None):
        self.ref, self.layout, self.n_layers, self.noise, self.margin = ref, layout, n_layers, noise, margin
        self.tie = tie
        self.gold: RowStore | None = None
        self.results: dict[tuple[str, str, str], SiteResult] = {}
        self.reference_nan: str | None = None
        self.missing = 0

    def result(self, sp: sites.SitePath, f: str, phase: str) -> SiteResult:
        key = (sp.path, f, phase)
        res = self.results.get(key)
        if res is None:
            res = SiteResult(
                sp.path, f, phase, sp.site.kind, sp.site.submodule, sp.layer, sites.order_key(sp, self.n_layers)
            )
            res.threshold, res.threshold_source = self.noise.threshold(sp.template, f, phase, sp.site.kind)
            if sp.site.inner_dtype is not None:
                res.inner_eps = torch.finfo(getattr(torch, sp.site.inner_dtype)).eps
            res.flip_threshold = self.noise.flip_threshold(sp.template, f, phase)
            self.results[key] = res
        return res

    def call(self, call, dump: Dump) -> None:
        sp = call.site
        values = {f: call.tensor(dump, f) for f in call.value_fields}
        wanted = {f: self.ref.gather(call.path, f, call.keys, v) for f, v in values.items()}
        # a row is compared only where the reference holds every field of it (a missing field would otherwise be
        # compared against the candidate's own values and pass); the others count as missing
        found = torch.stack([w[1] for w in wanted.values()]).all(0)
        self.missing += sum(1 for k, ok in zip(call.keys, found.tolist()) if k is not None and not ok)
        golden = {}
        if self.gold is not None:
            golden = {f: self.gold.gather(call.path, f, call.keys, v) for f, v in values.items()}
        by_phase: dict[str, list[int]] = {}
        for i, k in enumerate(call.keys):
            if k is not None:
                by_phase.setdefault(row_phase(self.layout, sp, k), []).append(i)
        for phase, rows in by_phase.items():
            idx = [i for i in rows if bool(found[i])]
            keys = [call.keys[i] for i in idx]
            for f in values:
                res = self.result(sp, f, phase)
                res.rows += len(rows)
                res.compared += len(idx)
            if not idx:
                continue
            got = {f: v[idx] for f, v in values.items()}
            want = {f: w[0][idx] for f, w in wanted.items()}
            for f, w in want.items():
                if w.is_floating_point() and not torch.isfinite(w.double()).all():
                    # the run fails here, and the site's own row says so (a table of passes under a failed
                    # verdict would contradict it)
                    res = self.result(sp, f, phase)
                    if not any(r.startswith("the reference produced NaN/Inf") for r in res.reasons):
                        res.reasons.append("the reference produced NaN/Inf here")
                    bad = (~torch.isfinite(w.double()).flatten(1).all(1)).nonzero().flatten()
                    _first(res, (call.step, *keys[int(bad[0])]))
                    if self.reference_nan is None:
                        self.reference_nan = f"{call.path}:{f} (step {call.step})"
            gold = {f: g[0][idx] for f, g in golden.items() if bool(g[1][idx].all())}
            if sp.site.kind == "choice":
                self.choice(sp, phase, got, want, gold, keys, call.step)
            else:
                for f in got:
                    self.floats(self.result(sp, f, phase), got[f], want[f], gold.get(f), keys, call.step)

    def choice(self, sp, phase, got, want, gold, keys, step) -> None:
        """Expert ids / indexer top-k: flips as sets; routing weights compared where the sets agree, in id order."""
        ids = "out.1" if "out.1" in got else "out"
        res = self.result(sp, ids, phase)
        diff = _set_differences(got[ids], want[ids])
        flipped = diff > 0
        if not torch.equal(got[ids], want[ids]):
            res.bitwise = False
        for i in flipped.nonzero().flatten().tolist():
            if self.tie is not None and self.tie(sp.path, keys[i], got[ids][i], want[ids][i]):
                res.ties += 1
                continue
            res.flips += 1
            m = self.margin(sp.path, keys[i]) if self.margin is not None else None
            if m is not None:
                res.flip_margins.append(m)
            _first(res, (step, *keys[i]))
        if ids == "out.1":
            keep = (~flipped).nonzero().flatten()
            if keep.numel():
                order_c, order_w = got[ids][keep].argsort(-1), want[ids][keep].argsort(-1)
                wc = got["out.0"][keep].gather(-1, order_c)
                ww = want["out.0"][keep].gather(-1, order_w)
                wg = gold["out.0"][keep].gather(-1, order_w) if "out.0" in gold else None
                self.floats(self.result(sp, "out.0", phase), wc, ww, wg, [keys[i] for i in keep.tolist()], step)

    def floats(self, res: SiteResult, c, w, g, keys, step) -> None:
        if not torch.equal(c, w):
            res.bitwise = False
        err = _row_errors(c, w)
        worst = int(err.argmax())
        if res.worst is None or float(err[worst]) > res.max_err:
            res.max_err, res.worst = float(err[worst]), (step, *keys[worst])
        bad = err > res.threshold
        # Rows over the dtype floor but within the envelope are legitimate one by one; together, over the whole
        # site, they must be no further from the golden than the reference is (golden_factor): a small systematic
        # loss (one scale for a whole tensor, say) hides under the envelope row by row but not in the aggregate
        suspect = (err > NoiseModel.floor(res.kind, res.field)) & ~bad
        if suspect.any():
            res.suspects += int(suspect.sum())
            res.suspect_eps = torch.finfo(c.dtype).eps
            where = (step, *keys[int(suspect.nonzero()[0])])
            if res.suspect_first is None or where < res.suspect_first:
                res.suspect_first = where
            if g is not None:
                c64, w64, g64 = c[suspect].double(), w[suspect].double(), g[suspect].double()
                for i, v in enumerate((c64 - g64, w64 - g64, g64)):
                    res.suspect_sums[i] += float(torch.linalg.vector_norm(torch.nan_to_num(v)) ** 2)
        if not bad.any():
            return
        if g is not None:
            # the golden's second opinion on the rows over the envelope: no further from the truth than the reference
            # is, where the reference is exact to the golden (a segment of plain fp32 torch), no further than the
            # stored dtype's rounding (or the site's coarser inner one): a kernel may round differently, never by more
            dr, dc = _rel(w[bad], g[bad]), _rel(c[bad], g[bad])
            res.golden_ref, res.golden_cand = max(res.golden_ref or 0.0, dr), max(res.golden_cand or 0.0, dc)
            if dc <= _golden_allowed(res, dr, torch.finfo(c.dtype).eps, self.noise.golden_factor):
                return
        for i in bad.nonzero().flatten().tolist():
            res.failures += 1
            _first(res, (step, *keys[i]))


def _golden_allowed(res: SiteResult, dr: float, eps: float, factor: float) -> float:
    """How far from the golden the candidate may be: `factor` times the reference's distance, or the output dtype's
    rounding where the reference is exact to the golden; at a site with a coarser inner rounding (`Site.inner_dtype`)
    at least that rounding's unit, the most a kernel moves its values by rounding each element there the other way."""
    return max(factor * max(dr, eps / 2), res.inner_eps)


def _first(res: SiteResult, where: tuple) -> None:
    if res.first_failure is None or where < res.first_failure:
        res.first_failure = where


def _judge(r: SiteResult, golden_factor: float) -> None:
    sc, sr, sg = r.suspect_sums
    if r.suspects and sg > 0:
        dc, dr = math.sqrt(sc / sg), math.sqrt(sr / sg)
        if dc > _golden_allowed(r, dr, r.suspect_eps, golden_factor):
            r.reasons.append(
                f"{r.suspects} rows within the noise threshold are together {dc:.3g} from the float64 golden, "
                f"the reference {dr:.3g} (allowed {golden_factor:g}x"
                + (f", at least its inner {r.inner_eps:.3g})" if r.inner_eps else ")")
            )
            _first(r, r.suspect_first)
    if r.compared == 0:
        if r.rows:
            r.reasons.append(f"{r.rows} rows with no reference value")
        return
    if r.flips:
        limit = r.flip_threshold or 0.0
        if r.flips > limit * r.compared:
            near = f"; score margins {_margins(r.flip_margins)}" if r.flip_margins else ""
            tied = f" ({r.ties} more chose among exactly tied scores: not counted)" if r.ties else ""
            r.reasons.append(
                f"{r.flips} of {r.compared} rows chose other ids (allowed {limit:.3g} of rows){tied}{near}"
            )
    if r.failures:
        msg = f"{r.failures} rows beyond the noise threshold {r.threshold:.3g} (worst {r.max_err:.3g})"
        if r.golden_cand is not None:
            msg += f"; golden distance {r.golden_cand:.3g} vs the reference's {r.golden_ref:.3g}"
        r.reasons.append(msg)


def _margins(margins: list[float]) -> str:
    m = sorted(margins)
    return f"min {m[0]:.3g}, median {m[len(m) // 2]:.3g}, max {m[-1]:.3g}"


def _row_errors(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row |c - w| / |w| in float64; NaN/Inf where the reference has a finite value counts as infinite."""
    c64, w64 = c.double().flatten(1), w.double().flatten(1)
    bad = ~torch.isfinite(c64).all(1) & torch.isfinite(w64).all(1)
    num = torch.linalg.vector_norm(torch.nan_to_num(c64 - w64, nan=0.0, posinf=0.0, neginf=0.0), dim=1)
    den = torch.linalg.vector_norm(torch.nan_to_num(w64, nan=0.0, posinf=0.0, neginf=0.0), dim=1)
    err = torch.where(den > 0, num / den.clamp(min=1e-300), torch.where(num > 0, math.inf, 0.0))
    same = (c64 == w64) | (c64.isnan() & w64.isnan())
    err = torch.where(same.all(1), 0.0, err)
    return torch.where(bad, math.inf, err)


def _rel(x: torch.Tensor, g: torch.Tensor) -> float:
    x64, g64 = x.double(), g.double()
    den = float(torch.linalg.vector_norm(g64))
    num = float(torch.linalg.vector_norm(x64 - g64))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _set_differences(c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per row, how many of w's valid ids (>= 0) are not in c's row (order-free: ties may reorder top-k)."""
    c2, w2 = c.reshape(c.shape[0], -1).long(), w.reshape(w.shape[0], -1).long()
    hit = (w2.unsqueeze(-1) == c2.unsqueeze(-2)).any(-1)  # [rows, k]
    extra = (c2 >= 0).sum(1) != (w2 >= 0).sum(1)
    return ((~hit) & (w2 >= 0)).sum(1) + extra.long()

"""The errors of one site per (request, position): the data behind the report's heatmap.

The verdict keeps, per (site, field, phase), only its worst and first failing rows; the heatmap needs every row of
one site. It is extracted for one site only (the first failure, else the site closest to its threshold), while the
run's dumps are still in memory, and bounded (`MAX_POSITIONS` per request): a few thousand floats in the report.
"""

import math

from parity.compare.loader import Dump
from parity.compare.rows import RowStore, calls
from parity.compare.verdict import SiteResult, Verdict, _row_errors, _set_differences

MAX_POSITIONS = 4096  # per request: keeps summary.json small on long prompts (the positions past it are dropped)


def worst_site(verdict: Verdict) -> SiteResult | None:
    """The first failure; on a pass, the compared site with the largest error relative to its threshold."""
    if verdict.first is not None:
        return verdict.first
    compared = [r for r in verdict.results if r.compared]
    return max(compared, key=_closeness, default=None)


def _closeness(r: SiteResult) -> tuple:
    # bitwise sites rank last; a zero threshold (bitwise gate) with any error ranks first
    ratio = r.max_err / r.threshold if r.threshold else (0.0 if r.max_err == 0 else math.inf)
    return (not r.bitwise, ratio, r.order)


def site_rows(reference: Dump, candidate: Dump, n_layers: int, site: SiteResult, run: str) -> dict:
    """Every row error of `site` (its path and field, all phases) in `candidate` against `reference`, keyed by
    request and position; a row computed twice (a replay) keeps its larger error. The measure is the verdict's:
    the relative L2 error of a row, or for id fields the number of ids that differ as sets."""
    # the reference rows gathered as the verdict gathers them (id lists of another top-k width fitted to the
    # candidate's: rows of ragged widths do not stack)
    ref = RowStore.from_dump(reference, n_layers, only=(site.path, site.field))
    ids = not _is_float(site)
    errors: dict[str, dict[int, float]] = {}
    for call in calls(candidate, n_layers):
        if call.path != site.path or site.field not in call.records:
            continue
        got = call.tensor(candidate, site.field)
        want, found = ref.gather(site.path, site.field, call.keys, got)
        idx = [i for i, k in enumerate(call.keys) if bool(found[i]) and k[1] < MAX_POSITIONS]
        if not idx:
            continue
        c, w = got[idx], want[idx]
        err = _set_differences(c, w).double() if ids else _row_errors(c, w)
        for j, i in enumerate(idx):
            req, pos = call.keys[i]
            row = errors.setdefault(str(req), {})
            row[pos] = max(row.get(pos, 0.0), float(err[j]))
    return {
        "site": site.path,
        "field": site.field,
        "submodule": site.submodule,
        "layer": site.layer,
        "run": run,
        "measure": "ids differing (as sets)" if ids else "relative L2 error",
        "threshold": site.threshold,
        "max_positions": MAX_POSITIONS,
        # JSON-friendly: per request, positions ascending with their errors (inf for NaN/Inf rows)
        "requests": {
            r: {"positions": sorted(p), "errors": [_finite(p[k]) for k in sorted(p)]} for r, p in sorted(errors.items())
        },
    }


def _is_float(site: SiteResult) -> bool:
    # id fields: the indexer's top-k (`out`) and the routing's expert ids (`out.1`) of a choice site
    return not (site.kind == "choice" and (site.field == "out.1" or site.path.endswith("indexer.topk")))


def _finite(v: float) -> float | str:
    return v if math.isfinite(v) else "inf"

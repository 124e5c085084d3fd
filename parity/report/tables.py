"""What the pages and the CSV show, derived from a summary's RunReport rows (plain dicts): the first divergence,
per-block curves per phase, flip counts, the worst slices. No rendering here."""

import math
from collections import Counter

from parity.compare.thresholds import NON_BITWISE_DEFAULTS

PHASES = ("prefill", "chunk", "decode", "mtp")


def ratio(row: dict) -> float:
    """A row's worst error over its threshold; a bitwise gate (threshold 0) gives 0 when bitwise, else inf."""
    t = row.get("threshold")
    if t:
        return row["max_err"] / t
    return 0.0 if row["bitwise"] or row["max_err"] == 0 else math.inf


def gauge(rows: list[dict]) -> str:
    """What the curves plot: 'ratio' (error / threshold) when every threshold is positive, else 'error' (a bitwise
    gate has threshold 0: any error fails, and the raw error is what can be shown)."""
    return "ratio" if rows and all(r.get("threshold") for r in rows) else "error"


def block(row: dict) -> str:
    """`layers.2` / `mtp.0` / `head`: the block a site row belongs to."""
    parts = row["site"].split(".")
    return ".".join(parts[:2]) if parts[0] in ("layers", "mtp") and len(parts) > 2 else "head"


def blocks(rows: list[dict]) -> list[str]:
    """Blocks in execution order (the rows are: layers, the model's logits, then MTP blocks)."""
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(block(r), None)
    return list(seen)


def curves(rows: list[dict]) -> dict[str, list[float | None]]:
    """Per phase, per block (in `blocks` order), the worst value of the block's sites (`gauge`); None where the
    block has no rows in that phase."""
    how = gauge(rows)
    order = blocks(rows)
    out: dict[str, list[float | None]] = {}
    for phase in PHASES:
        values: list[float | None] = [None] * len(order)
        for r in rows:
            if r["phase"] != phase or not r["compared"]:
                continue
            i = order.index(block(r))
            v = ratio(r) if how == "ratio" else r["max_err"]
            values[i] = v if values[i] is None else max(values[i], v)
        if any(v is not None for v in values):
            out[phase] = values
    return out


def threshold_sources(rows: list[dict]) -> dict[str, int]:
    """How many (site, field, phase) rows each threshold source judged (calibrated, floor, default, bitwise)."""
    out: dict[str, int] = {}
    for r in rows:
        src = r.get("threshold_source", "")
        out[src] = out.get(src, 0) + 1
    return out


def first_divergence(rows: list[dict]) -> dict | None:
    """The verdict's first failure: the earliest failing site in execution order (the rows are ordered), and of its
    failing rows the earliest (step, request, position)."""
    failing = [r for r in rows if not r["passed"]]
    if not failing:
        return None
    site = failing[0]["site"]
    same = [r for r in failing if r["site"] == site and r.get("first_failure")]
    if not same:
        return failing[0]
    return min(same, key=lambda r: (*r["first_failure"], r["field"]))


def flips(rows: list[dict]) -> list[dict]:
    """Expert-id and indexer top-k flips per site and phase (only the choice rows that have ids)."""
    out = []
    for r in rows:
        if r.get("flip_threshold") is None or not r["compared"]:
            continue
        if not (r["site"].endswith("ffn.route") and r["field"] == "out.1") and not r["site"].endswith("indexer.topk"):
            continue
        out.append(r)
    return out


def worst(rows: list[dict], n: int = 15) -> list[dict]:
    """The n slices closest to (or furthest over) their thresholds: failing first, then by ratio."""
    compared = [r for r in rows if r["compared"] and not r["bitwise"]]
    return sorted(compared, key=lambda r: (r["passed"], -ratio(r), -r["max_err"]))[:n]


def where(t) -> str:
    """(step, request, position) as text."""
    return "-" if not t else f"step {t[0]}, request {t[1]}, position {t[2]}"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.3g}"
    return str(v)


def noise_mismatch(rep: dict) -> str:
    """One line when the run is judged by thresholds that were not measured for it, '' otherwise: a calibration made
    with other backends for some ops or on another device (its provenance says which), or the default allowances with
    non-bitwise kernels selected. Such thresholds describe another mix: a clean failure may be this mix's own noise
    (an FP4 rounding edge crossed, near-tied top-k entries reordered), a pass says little. The fix is a calibration
    of this mix; the line names the command."""
    prov = rep.get("noise_provenance") or {}
    backends = {op: b for op, b in (rep.get("backends") or {}).items() if op != "candidate"}
    calibrated = prov.get("backends")
    odd = []
    if isinstance(calibrated, dict):
        moved: dict[tuple, list[str]] = {}  # (this run's backend, the calibration's) -> ops
        for op, b in backends.items():
            if calibrated.get(op, b) != b:
                moved.setdefault((b, calibrated[op]), []).append(op)
        for (b, cal), ops in moved.items():
            named = ", ".join(ops) if len(ops) <= 4 else f"{len(ops)} ops"
            odd.append(f"{named} on {b} (calibrated: {cal})")
    device, cal_device = rep.get("device"), prov.get("device")
    if device and cal_device and device.split(":")[0] != str(cal_device).split(":")[0]:
        odd.append(f"device {device} (calibrated: {cal_device})")
    if odd:
        why = "the noise model was calibrated for another mix: " + ", ".join(odd)
    elif str(rep.get("noise", "")).startswith(NON_BITWISE_DEFAULTS):
        why = "non-bitwise kernels are judged by the default allowances, which were not measured for them"
    else:
        return ""
    # the mix as the environment selects it: the most common backend as the default, the others per op
    counts = Counter(backends.values())
    default = max(counts, key=lambda b: (counts[b], b == "torch")) if counts else "torch"
    mix = ",".join(f"{op}={b}" for op, b in backends.items() if b != default)
    env = (f"PARITY_BACKEND={default} " if default != "torch" else "") + (f"PARITY_OPS={mix} " if mix else "")
    dev = f" --device {device}" if device and device != "cpu" else ""
    return f"{why}; calibrate this mix: {env}parity calibrate CASE --out FILE{dev}, then run with --calibration FILE"

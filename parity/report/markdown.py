"""`report.md`: the verdict, the first divergence, the thresholds' provenance, flips and the worst slices as text
(for a PR comment or a terminal); the plots are in report.html next to it."""

import json

from parity.report import tables
from parity.report.repro_script import argv
from parity.report.tables import fmt, where


def _table(head: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def render(summary: dict, repro_files: list[str]) -> str:
    rep, inv = summary["report"], summary["invocation"]
    status = "PASS" if rep["passed"] else "FAIL"
    lines = [f"# parity run `{rep['case']}`: **{status}**", "",
             f"{summary['created']}, device {rep['device']}, wall {rep.get('wall_s', 0):.1f} s. Plots: `report.html`.",
             ""]  # fmt: skip
    if rep.get("planted"):
        lines += [f"Planted bug (selftest library, optimized side only): **{rep['planted']}**", ""]
    first = tables.first_divergence(rep["sites"])
    lines += ["## First divergence", ""]
    if first is None:
        lines += [rep["location"] or "none: every site of every layer is within its threshold.", ""]
    else:
        step, req, pos = first.get("first_failure") or (None, None, None)
        layer = "model" if first["layer"] is None else first["layer"]
        lines += _table(["layer", "sub-module (op)", "site", "phase", "step", "request", "position"],
                        [[layer, first["submodule"], f"{first['site']}:{first['field']}", first["phase"], step, req,
                          pos]])  # fmt: skip
        lines += ["", rep["location"], ""]
    lines += ["## Thresholds", "", f"Noise model: {rep['noise']}", ""]
    mismatch = tables.noise_mismatch(rep)
    if mismatch:
        lines += [f"**Not measured for this run**: {mismatch}", ""]
    for k, v in (rep.get("noise_provenance") or {}).items():
        lines.append(f"- provenance {k}: {json.dumps(v)[:300]}")
    sources = tables.threshold_sources(rep["sites"])
    lines += [f"- {n} (site, field, phase) rows judged by: {src}" for src, n in sources.items()]
    flips = tables.flips(rep["sites"])
    lines += ["", "## Expert and top-k flips", ""]
    lines += _table(["site", "phase", "flips", "rows", "status"],
                    [[r["site"], r["phase"], r["flips"], r["compared"], "pass" if r["passed"] else "FAIL"]
                     for r in flips]) if flips else ["No expert-id or indexer top-k rows."]  # fmt: skip
    worst = tables.worst(rep["sites"])
    lines += ["", "## Worst slices (own error)", ""]
    rows = [[r["site"], r["field"], r["phase"], fmt(r["max_err"]), fmt(r["threshold"]), where(r.get("worst")),
             "pass" if r["passed"] else "FAIL"] for r in worst]  # fmt: skip
    head = ["site", "field", "phase", "worst error", "threshold", "worst row", "status"]
    lines += _table(head, rows) if worst else ["Every compared site is bitwise."]
    lines += ["", "## Slot invariance", "", "Not measured by `parity run` (see report.html).", ""]
    lines += ["## Kernel repro", ""]
    lines += [f"- `repro/{f}`" for f in repro_files] or ["None in this folder."]
    env = " ".join(f"{k}={v}" for k, v in inv.get("env", {}).items())
    lines += ["", "## Reproduce", "", "```bash", "./repro.sh", f"# = {env + ' ' if env else ''}parity "
              + " ".join(argv(inv)), "```", ""]  # fmt: skip
    return "\n".join(lines)

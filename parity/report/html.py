"""`report.html`: one self-contained page (inline CSS and SVG, one inline script; nothing fetched) with the
verdict, the first divergence, the thresholds and their provenance, per-block curves of the forced (own) and the
chained errors per phase, the heatmap of the worst site, flips, the worst slices, the requests, kernel repros
and how to rerun the case."""

import html
import json

from parity.report import plots, tables
from parity.report.repro_script import argv
from parity.report.tables import fmt, where

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
.verdict { display: inline-block; padding: 4px 14px; border-radius: 4px; color: #fff; font-weight: bold; }
.PASS { background: #2e7d32; } .FAIL { background: #c62828; }
.fail { color: #c62828; } .note { color: #666; font-size: 0.9em; }
figure { margin: 0.6em 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""

# Counts the figures that laid out with a non-empty box: a reader (and the browser test) sees the plots rendered
_SCRIPT = """
window.addEventListener("load", function () {
  var n = 0;
  document.querySelectorAll("figure svg").forEach(function (svg) {
    var box = svg.getBoundingClientRect();
    if (box.width > 0 && box.height > 0 && svg.querySelector("path")) { n += 1; }
  });
  document.body.setAttribute("data-plots-rendered", String(n));
});
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(head: list[str], rows: list[list], cls: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        attr = f' class="{cls[i]}"' if cls and cls[i] else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _figure(svg: str, caption: str, plot: str) -> str:
    return f'<figure data-plot="{plot}">{svg}<figcaption class="note">{_e(caption)}</figcaption></figure>'


def render(summary: dict, repro_files: list[str]) -> str:
    rep, inv = summary["report"], summary["invocation"]
    status = "PASS" if rep["passed"] else "FAIL"
    parts = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>parity {status}: {_e(rep['case'])}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>parity run <code>{_e(rep['case'])}</code></h1>",
        f'<p><span id="verdict" class="verdict {status}">{status}</span> '
        f"<span class='note'>{_e(summary['created'])} · device {_e(rep['device'])} · wall {rep.get('wall_s', 0):.1f} s"
        "</span></p>",
    ]
    if rep.get("planted"):
        parts.append(f"<p id='planted'>Planted bug (selftest library, optimized side only): <b>{_e(rep['planted'])}"
                     "</b></p>")  # fmt: skip
    parts += [_divergence(rep), _thresholds(rep), _curves(rep), _heatmap(rep), _slots(), _flips(rep)]
    parts += [_worst(rep), _requests(rep), _kernel_repros(repro_files), _rerun(inv), _run_facts(rep)]
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _divergence(rep: dict) -> str:
    first = tables.first_divergence(rep["sites"])
    if first is None:
        if rep["location"]:  # a failure that no site row carries (e.g. unaligned runs)
            return f"<h2>First divergence</h2><p id='location' class='fail'>{_e(rep['location'])}</p>"
        return "<h2>First divergence</h2><p id='location'>none: every site of every layer is within its threshold.</p>"
    step, req, pos = first.get("first_failure") or (None, None, None)
    layer = "model" if first["layer"] is None else first["layer"]
    rows = [["layer", layer], ["sub-module (op)", first["submodule"]], ["site", f"{first['site']}:{first['field']}"],
            ["phase", first["phase"]], ["step", step], ["request", req], ["position", pos],
            ["why", first["reasons"]]]  # fmt: skip
    return (
        "<h2>First divergence</h2>"
        f"<p id='location' class='fail'>{_e(rep['location'])}</p><div id='first-divergence'>"
        + _table(["", ""], rows)
        + "</div>"
    )


def _thresholds(rep: dict) -> str:
    sources = tables.threshold_sources(rep["sites"])
    prov = rep.get("noise_provenance") or {}
    out = ["<h2>Thresholds and their provenance</h2>", f"<p>Noise model: <b id='noise'>{_e(rep['noise'])}</b>"]
    out.append(
        " (bitwise: a decode-exact case, every site must equal the reference)</p>"
        if rep.get("exact") and rep["noise"] == "decode-exact"
        else "</p>"
    )
    mismatch = tables.noise_mismatch(rep)
    if mismatch:
        out.append(f"<p id='noise-mismatch' class='fail'>Not measured for this run: {_e(mismatch)}</p>")
    if prov:
        out.append(_table(["provenance", "value"], [[k, json.dumps(v)[:300]] for k, v in prov.items()]))
    out.append(_table(["threshold source", "(site, field, phase) rows"], [[k, n] for k, n in sources.items()]))
    return "\n".join(out)


def _curves(rep: dict) -> str:
    how = tables.gauge(rep["sites"])
    note = (
        "y: each block's worst (site, field) error divided by its threshold; above the dashed line fails."
        if how == "ratio"
        else "y: each block's worst relative error; the gate is bitwise (threshold 0), so any error above the "
        f"axis floor {plots.FLOOR:g} fails; bitwise sites sit at the floor."
    )
    out = ["<h2>Per-layer errors per phase</h2>", f"<p class='note'>{_e(note)}</p>"]
    first = tables.first_divergence(rep["sites"])
    mark = tables.block(first) if first is not None else None
    out.append(_figure(plots.layer_curves(rep["sites"], "own error (teacher-forced)", "forced", mark),
                       "Own error: every site fed the reference's inputs, so each block shows only its own error.",
                       "forced"))  # fmt: skip
    if rep["chained"]:
        out.append(_figure(plots.layer_curves(rep["chained"], "chained error (the engine on its own)", "chained"),
                           "Chained error: the engine run as a user runs it; errors carry from layer to layer.",
                           "chained"))  # fmt: skip
    return "\n".join(out)


def _heatmap(rep: dict) -> str:
    rm = rep.get("rowmap")
    head = "<h2>Requests x positions of the worst site</h2>"
    if not rm or not rm.get("requests"):
        return head + "<p class='note'>No per-row data in this report.</p>"
    bitwise = all(e == 0 for v in rm["requests"].values() for e in v["errors"])
    note = (f"{rm['site']}:{rm['field']} ({rm['submodule']}), the {rm['run']} run: {rm['measure']} of every row "
            f"(threshold {fmt(rm['threshold'])}); blank: no row at that position"
            + ("; every row is bitwise (drawn at the floor)." if bitwise else "."))  # fmt: skip
    return head + _figure(plots.heatmap(rm, "heatmap"), note, "heatmap")


def _slots() -> str:
    return (
        "<h2>Slot invariance</h2><p id='slots' class='note'>Not available: <code>parity run</code> does not measure "
        "slot invariance. Run it again with <code>--dump DIR</code>, then <code>parity slot-invariance DIR/chained"
        "</code> shows which batch slots differ from the same request elsewhere.</p>"
    )


def _flips(rep: dict) -> str:
    rows = tables.flips(rep["sites"])
    head = "<h2>Expert and top-k flips</h2>"
    if not rows:
        return head + "<p class='note'>No expert-id or indexer top-k rows in this run.</p>"
    body = [[r["site"], r["phase"], r["flips"], r["compared"], fmt(r["flip_threshold"]),
             ", ".join(fmt(m) for m in r.get("flip_margins", [])[:5]) or "-", "pass" if r["passed"] else "FAIL"]
            for r in rows]  # fmt: skip
    cls = ["" if r["passed"] else "fail" for r in rows]
    total = sum(r["flips"] for r in rows)
    return (
        head
        + f"<p>{total} flipped rows in all.</p>"
        + _table(
            ["site", "phase", "flips", "rows", "allowed (fraction)", "smallest score margins", "status"], body, cls
        )
    )


def _worst(rep: dict) -> str:
    rows = tables.worst(rep["sites"])
    head = "<h2>Worst slices (own error)</h2>"
    if not rows:
        return head + "<p class='note'>Every compared site is bitwise equal to the reference.</p>"
    body = [[r["site"], r["field"], r["phase"], fmt(r["max_err"]), fmt(r["threshold"]), fmt(tables.ratio(r)),
             where(r.get("worst")), r.get("failures", 0), "pass" if r["passed"] else "FAIL"] for r in rows]  # fmt: skip
    cls = ["" if r["passed"] else "fail" for r in rows]
    return head + _table(
        ["site", "field", "phase", "worst error", "threshold", "ratio", "worst row", "failing rows", "status"],
        body,
        cls,
    )


def _requests(rep: dict) -> str:
    body = [[r["index"], r["prompt_len"], r["first_chunk"], r["tokens"], "yes" if r["greedy_equal"] else "no",
             fmt(r["logits_max_err"]), r["mtp"]] for r in rep["requests"]]  # fmt: skip
    return "<h2>Requests (chained run)</h2>" + _table(
        ["request", "prompt", "first chunk", "tokens", "greedy equal", "logits max err", "MTP accepted"], body
    )


def _kernel_repros(files: list[str]) -> str:
    head = "<h2>Kernel repro</h2>"
    if not files:
        return head + "<p id='kernel-repro' class='note'>No kernel repro in this folder (no <code>repro/</code>).</p>"
    items = "".join(f"<li><a href='repro/{_e(f)}'><code>repro/{_e(f)}</code></a></li>" for f in files)
    return head + f"<ul id='kernel-repro'>{items}</ul>"


def _rerun(inv: dict) -> str:
    return (
        "<h2>Reproduce</h2><p><code>./repro.sh</code> in this folder reruns exactly this case (exit 1 reproduces a "
        f"parity failure):</p><pre>{_e(' '.join(_argv(inv)))}</pre>"
    )


def _argv(inv: dict) -> list[str]:
    env = [f"{k}={v}" for k, v in inv.get("env", {}).items()]
    return [*env, "parity", *argv(inv)]


def _run_facts(rep: dict) -> str:
    odd = {op: b for op, b in rep["backends"].items() if b != "torch"}
    rows = [["machine", ", ".join(f"{k} {v}" for k, v in rep["machine"].items())],
            ["op backends", ", ".join(f"{o}={b}" for o, b in odd.items()) or "all torch"],
            ["golden run", "yes" if rep.get("golden") else "no"],
            ["timings (s)", ", ".join(f"{k} {v:.1f}" for k, v in rep["timings"].items())]]  # fmt: skip
    return "<h2>Run</h2>" + _table(["", ""], rows)

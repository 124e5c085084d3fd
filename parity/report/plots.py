"""The report's plots as inline SVG text: matplotlib's object API (`Figure`, no pyplot global state; the Agg
backend, never a display), text drawn as paths so the page needs no font, fixed metadata so a re-render is
identical."""

import io
import math

import matplotlib

matplotlib.use("Agg")  # never a GUI backend, even where a display exists

from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from parity.report.tables import PHASES, blocks, curves, gauge  # noqa: E402

FLOOR = 1e-12  # where a zero (bitwise) error sits on a log axis
# phases often coincide (same values): other markers, sizes and dashes keep every one visible
_STYLE = {
    "prefill": dict(color="#1f77b4", marker="o", markersize=9, linestyle="-"),
    "chunk": dict(color="#ff7f0e", marker="s", markersize=7, linestyle="--"),
    "decode": dict(color="#2ca02c", marker="^", markersize=5, linestyle=":"),
    "mtp": dict(color="#9467bd", marker="D", markersize=6, linestyle="-"),
}


def _svg(fig: Figure, name: str) -> str:
    buf = io.StringIO()
    # svg.hashsalt per figure: clip-path ids stay unique when several SVGs are inlined into one page
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # inline: without the XML prolog and DOCTYPE


def layer_curves(rows: list[dict], title: str, name: str, mark: str | None = None) -> str:
    """Per phase, each block's worst site: error / threshold (1 = the gate), or the raw error under a bitwise
    gate; zeros (bitwise) are drawn at FLOOR. `mark`: the block of the first divergence (a red vertical line)."""
    data = curves(rows)
    labels = blocks(rows)
    fig = Figure(figsize=(7.5, 3.4))
    ax = fig.add_subplot()
    for phase in PHASES:
        if phase not in data:
            continue
        xs = [i for i, v in enumerate(data[phase]) if v is not None]
        ys = [_plottable(data[phase][i]) for i in xs]
        ax.plot(xs, ys, label=phase, **_STYLE[phase])
    ratio = gauge(rows) == "ratio"
    if ratio:
        ax.axhline(1.0, color="#d62728", linestyle="--", linewidth=1, label="threshold")
    if mark in labels:
        ax.axvline(labels.index(mark), color="#d62728", alpha=0.4, linewidth=6, label="first divergence")
    ax.set_yscale("log")
    ax.set_ylabel("worst error / threshold" if ratio else "worst relative error (bitwise gate)")
    ax.set_xticks(range(len(labels)), [b.replace("layers.", "L").replace("mtp.", "MTP") for b in labels])
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig, name)


def _plottable(v: float) -> float:
    if math.isinf(v):
        return 1e12  # infinite (NaN/Inf rows, or any error under a zero threshold): the top of the axis
    return max(v, FLOOR)


def heatmap(rowmap: dict, name: str) -> str:
    """Requests x positions of one site's row errors (log colour scale; blank where no row exists)."""
    reqs = list(rowmap["requests"])
    width = max((max(v["positions"]) + 1 for v in rowmap["requests"].values() if v["positions"]), default=1)
    grid = [[math.nan] * width for _ in reqs]
    for i, r in enumerate(reqs):
        for p, e in zip(rowmap["requests"][r]["positions"], rowmap["requests"][r]["errors"]):
            grid[i][p] = _plottable(math.inf if e == "inf" else e)
    fig = Figure(figsize=(7.5, 0.6 + 0.45 * max(len(reqs), 2)))
    ax = fig.add_subplot()
    finite = [v for row in grid for v in row if not math.isnan(v)]
    top = max(finite, default=1.0)
    norm = LogNorm(vmin=FLOOR, vmax=max(top, FLOOR * 10))
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", norm=norm, cmap="viridis")
    ax.set_yticks(range(len(reqs)), [f"req {r}" for r in reqs])
    ax.set_xlabel("position")
    ax.set_title(f"{rowmap['site']}:{rowmap['field']} ({rowmap['run']} run): {rowmap['measure']}", fontsize=10)
    fig.colorbar(image, ax=ax, pad=0.01)
    return _svg(fig, name)

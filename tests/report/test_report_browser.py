"""report.html opened in headless Chromium: the verdict, the first divergence (layer, phase, op) and the plots
render, with no console error; and the check itself fails on a page that is broken."""

import re

import pytest

from tests.report import browser

pytestmark = pytest.mark.skipif(
    not browser.available(), reason=f"{browser.CHROMIUM} absent (.ci/run installs the Debian package chromium)"
)


def _plots(dom: str) -> int:
    m = re.search(r'data-plots-rendered="(\d+)"', dom)
    assert m, "the page's script did not run"
    return int(m[1])


def _cell(dom: str, label: str) -> str:
    m = re.search(rf"<tr><td>{re.escape(label)}</td><td>(.*?)</td></tr>", dom)
    assert m, f"no {label!r} row in the first-divergence table"
    return m[1]


def test_failing_report_shows_verdict_location_and_plots(failing):
    page = browser.open_page(failing.folder / "report.html")
    assert page.console == [] and browser.fetches(page.dom) == []
    assert '<span id="verdict" class="verdict FAIL">FAIL</span>' in page.dom
    assert (_cell(page.dom, "layer"), _cell(page.dom, "phase")) == ("0", "prefill")
    assert (_cell(page.dom, "sub-module (op)"), _cell(page.dom, "site")) == ("gate", "layers.0.ffn.route:out.0")
    assert "route-scale-dropped" in page.dom
    # own-error curves, chained-error curves, the heatmap: laid out with drawn paths
    assert _plots(page.dom) == 3
    for plot in ("forced", "chained", "heatmap"):
        assert f'data-plot="{plot}"' in page.dom
    assert "Not available: <code>parity run</code> does not measure slot invariance" in page.dom


def test_passing_report_shows_pass_and_plots(passing):
    page = browser.open_page(passing.folder / "report.html")
    assert page.console == [] and browser.fetches(page.dom) == []
    assert '<span id="verdict" class="verdict PASS">PASS</span>' in page.dom
    assert "none: every site of every layer is within its threshold" in page.dom
    assert _plots(page.dom) == 3


def test_the_check_fails_a_broken_page(failing, tmp_path):
    html = (failing.folder / "report.html").read_text()
    broken = tmp_path / "script-error.html"
    broken.write_text(html.replace("</body>", "<script>notDefined();</script></body>"))
    assert any("notDefined" in line for line in browser.open_page(broken).console)
    # the plots' SVG removed: the page still loads, and the count says no plot rendered
    no_plots = tmp_path / "no-plots.html"
    no_plots.write_text(re.sub(r"<svg.*?</svg>", "", html, flags=re.S))
    page = browser.open_page(no_plots)
    assert page.console == [] and _plots(page.dom) == 0
    # anything the page would fetch fails it (the report is self-contained)
    assert browser.fetches(html) == []
    for planted in (
        "<img src='x.png'>",
        '<link rel="stylesheet" href="https://cdn.example/s.css">',
        "<style>body { background: url(bg.png) }</style>",
        '<svg><image href="p.png"/></svg>',
    ):
        assert browser.fetches(html.replace("</body>", planted + "</body>")) != [], planted  # fmt: skip

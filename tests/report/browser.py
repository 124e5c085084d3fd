"""Open a page in headless Chromium (the Debian package): its DOM after scripts ran, and its console errors.

Chromium is started fully offline-minded (no background networking, no component updates, no sync, no QUIC) with
a throwaway profile. `--dump-dom` prints the DOM once the page's load event and its scripts have run;
`--enable-logging=stderr --v=0` prints every console message as `CONSOLE(...)` / `Uncaught ...` on stderr, which
is where errors of the page's own script and of resources it failed to load appear.
"""

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
)  # fmt: skip
# the page's console (Chromium logs every console message and uncaught error as `...:CONSOLE:<line>] "..."`) and
# failed loads; Chromium's own dbus / sandbox noise on a headless box is not the page's
_CONSOLE = re.compile(r":CONSOLE[:(]\d+|Uncaught|Failed to load resource|net::ERR_")


@dataclass
class Page:
    dom: str
    console: list[str]  # every console message of the page (the report logs none: any is an error) and failed load


# what would make a page fetch something: a tag's src / href other than a link (<a>), an in-page anchor or inline
# data, a CSS url() or @import (headless Chromium logs no console message for a missing file:// resource)
_FETCH = re.compile(
    r"<(?!a\b)(\w+)[^>]*?\b(?:src|href)\s*=\s*[\"']?(?!#|data:)([^\"'\s>]+)|url\(\s*[\"']?(?!#|data:)|@import"
)


def fetches(html: str) -> list[str]:
    """Everything in `html` that a browser would fetch: a self-contained page has nothing."""
    return [m[0] for m in _FETCH.finditer(html)]


def available() -> bool:
    return shutil.which(CHROMIUM) is not None


def open_page(path: Path, timeout: float = 60) -> Page:
    with tempfile.TemporaryDirectory(prefix="parity-chromium-") as profile:
        p = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", Path(path).resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if p.returncode != 0:
        raise RuntimeError(f"chromium exited {p.returncode}: {p.stderr[-2000:]}")
    return Page(p.stdout, [line for line in p.stderr.splitlines() if _CONSOLE.search(line)])

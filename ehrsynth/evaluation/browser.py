"""Open a report in headless Chromium: check what a reader's browser renders, and take the README screenshot.

Plain Chromium command lines, no driver: :func:`probe_report` injects a small script into a copy of the page
that records JavaScript errors and, once the page has loaded, writes every image's natural size and the
rendered section ids into the DOM, which ``--dump-dom`` then prints.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ehrsynth.errors import ConfigError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || "error"));
}, true);
(function () { var original = console.error; console.error = function () {
  window.__errors.push(Array.prototype.join.call(arguments, " ")); original.apply(console, arguments); }; })();
window.addEventListener("load", function () {
  var out = document.createElement("pre");
  out.id = "__probe";
  out.textContent = JSON.stringify({
    images: Array.from(document.images).map(function (i) { return [i.alt, i.naturalWidth, i.naturalHeight]; }),
    sections: Array.from(document.querySelectorAll("section[id]")).map(function (s) { return s.id; }),
    verdict: (document.getElementById("verdict") || {innerText: ""}).innerText,
    errors: window.__errors
  });
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str:
    """The path of a Chromium executable.

    Raises:
        ConfigError: when none is installed (``apt-get install chromium``).
    """
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(f"no headless browser found (looked for {', '.join(BROWSERS)}); apt-get install chromium")


def _run(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="ehrsynth-chromium-") as profile:
        return subprocess.run([find_browser(), *FLAGS, f"--user-data-dir={profile}", *arguments],
                              capture_output=True, text=True, timeout=timeout, check=False)


def probe_report(html: str | Path, *, timeout: float = 120) -> dict[str, Any]:
    """Render a report headless and return what the browser saw.

    Returns:
        ``{"images": [[alt, naturalWidth, naturalHeight], ...], "sections": [ids in order], "verdict": text,
        "errors": [JavaScript errors and failed loads], "returncode": int}``.

    Raises:
        ConfigError: when no browser is installed or the probe never ran (the page did not load).
    """
    html = Path(html)
    with tempfile.TemporaryDirectory(prefix="ehrsynth-probe-") as tmp:
        page = Path(tmp) / "report.html"
        page.write_text(html.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
        done = _run(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], timeout)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', done.stdout, flags=re.S)
    if found is None:
        raise ConfigError(f"the browser did not render {html.name} (exit {done.returncode})")
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    result = json.loads(text)
    result["returncode"] = done.returncode
    return result


def screenshot(html: str | Path, png: str | Path, *, width: int = 1280, height: int = 1600,
               timeout: float = 120) -> Path:
    """Save a PNG screenshot of the top ``width`` x ``height`` pixels of a page."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--window-size={width},{height}", f"--screenshot={png}", Path(html).resolve().as_uri()], timeout)
    if done.returncode != 0 or not png.is_file():
        raise ConfigError(f"the browser could not screenshot {Path(html).name} (exit {done.returncode})")
    return png

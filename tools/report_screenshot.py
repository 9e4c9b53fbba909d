"""Make docs/report.png: a headless-Chromium screenshot of the top of the demo report.

    python tools/report_screenshot.py                          # runs `ehrsynth demo` first (a few minutes)
    python tools/report_screenshot.py --report ehrsynth-demo/report/report.html

Needs Chromium (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ehrsynth.evaluation.browser import screenshot

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=None, help="an existing report.html (default: run the demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png", help="the PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1500)
    args = parser.parse_args()
    report = args.report
    with tempfile.TemporaryDirectory(prefix="ehrsynth-screenshot-") as tmp:
        if report is None:
            from ehrsynth.pipeline import run_demo

            report, _ = run_demo("halo", Path(tmp) / "demo", seed=0, progress=False)
        png = screenshot(report, args.out, width=args.width, height=args.height)
    print(f"wrote {png} ({png.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

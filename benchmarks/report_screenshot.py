"""Screenshot the sample report for docs/fairness.md.

Run after ``make demo`` (which writes ``runs/demo/covid_oxygen-report/report.html``)::

    .venv/bin/python benchmarks/report_screenshot.py [REPORT_HTML] [OUT_PNG]

Renders the report in Debian's headless Chromium and saves the top of the page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Chromium helpers live with the tests: tests/browser.py

from tests.browser import screenshot  # noqa: E402


def main() -> None:
    """Write the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, nargs="?",
                        default=ROOT / "runs" / "demo" / "covid_oxygen-report" / "report.html",
                        help="the report to render (default: make demo's COVID-19 report)")
    parser.add_argument("out", type=Path, nargs="?", default=ROOT / "docs" / "img" / "report.png",
                        help="the PNG to write (default: docs/img/report.png)")
    args = parser.parse_args()
    html, out = args.html, args.out
    if not html.is_file():
        sys.exit(f"{html} not found: run `make demo` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(html, out, width=1200, height=2400)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

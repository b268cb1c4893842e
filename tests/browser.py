"""Headless Chromium for the report: the browser check of ``report.html`` and the docs screenshot.

Used by ``tests/evaluation/test_report.py`` and ``benchmarks/report_screenshot.py`` (which puts
the repository root on ``sys.path`` to import it). Needs Debian's ``chromium`` package.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["find_chromium", "render_in_chromium", "screenshot"]


def find_chromium() -> str | None:
    """Path of Debian's ``chromium`` (or ``chromium-browser``), or ``None``.

    Returns
    -------
    str or None
    """
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_args(exe: str, profile: Path) -> list[str]:
    """Command line of a headless, sandbox-free Chromium with its own profile folder."""
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=10000"]


def render_in_chromium(html_path: str | os.PathLike[str], *, timeout: float = 120.0
                       ) -> dict[str, str]:
    """Load a report in headless Chromium and read the status its load handler records.

    Parameters
    ----------
    html_path : path-like
        A ``report.html``.
    timeout : float
        Seconds before giving up.

    Returns
    -------
    dict
        ``ready`` ("1" once loaded), ``errors`` (JavaScript errors and broken images, ``""``
        when none), ``sections`` (comma-separated section ids), ``images`` (count),
        ``notes`` (count of ``.note`` paragraphs) and ``shownnotes`` (the text of those laid
        out, joined by ``" | "``); values HTML-unescaped.

    Raises
    ------
    RuntimeError
        When Chromium is missing or fails.
    """
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's `chromium` package")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [*_chromium_args(exe, Path(tmp)), "--dump-dom", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"chromium exited with {out.returncode}: {out.stderr[-2000:]}")
    m = re.search(r'<div id="report-status"[^>]*>', out.stdout)
    if m is None:
        raise RuntimeError("the rendered page has no report-status element: not a report.html?")
    return {k: html.unescape(v) for k, v in re.findall(r'data-([a-z]+)="([^"]*)"', m.group(0))}


def screenshot(html_path: str | os.PathLike[str], png_path: str | os.PathLike[str], *,
               width: int = 1200, height: int = 2400, timeout: float = 120.0) -> Path:
    """Save a PNG screenshot of a report (the top ``height`` pixels) with headless Chromium.

    Parameters
    ----------
    html_path : path-like
        A ``report.html``.
    png_path : path-like
        Where to write the PNG.
    width, height : int
        Window size in pixels.
    timeout : float
        Seconds before giving up.

    Returns
    -------
    Path
        ``png_path``.

    Raises
    ------
    RuntimeError
        When Chromium is missing or writes no file.
    """
    exe = find_chromium()
    if exe is None:
        raise RuntimeError("Chromium not found: install Debian's `chromium` package")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [*_chromium_args(exe, Path(tmp)), f"--window-size={width},{height}",
             f"--screenshot={png}", Path(html_path).resolve().as_uri()],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {out.stderr[-2000:]}")
    return png

"""Screenshot of a job's report.html in headless Chromium, to look at the page as a reader sees it.

    .venv/bin/python benchmarks/report_screenshot.py newsclip-demo/output                  # -> output/report.png
    .venv/bin/python benchmarks/report_screenshot.py out/report.html --png /tmp/r.png --width 1280 --height 4000

Takes an output folder (its report.html) or the HTML file; writes a PNG of the top `--height` pixels of the page
(Chromium's --screenshot captures the window, not the whole page) and prints its path. Needs `chromium`
(Debian: apt-get install chromium) or `--chromium PATH`; the page is self-contained, so no network is needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str | None:
    """The browser to run: `explicit`, else $CHROMIUM, else the first of CANDIDATES on PATH."""
    if explicit:
        return explicit
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def report_path(target: Path) -> Path:
    """report.html of an output folder, or the file itself."""
    from newsclip.runtime.layout import Layout

    path = Layout(target).report_html if target.is_dir() else target
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}: run `newsclip report JOB.yaml` first")
    return path


def screenshot(html: Path, png: Path, width: int = 1280, height: int = 4000, chromium: str | None = None,
               timeout: float = 120) -> Path:
    """Render `html` in headless Chromium into `png`; RuntimeError with Chromium's output when no PNG comes."""
    browser = find_chromium(chromium)
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(CANDIDATES)}); pass --chromium PATH")
    png = png.resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)  # so a stale file never passes for this run's screenshot
    # a throw-away profile: no first-run state, no lock clash with a browser the user has open
    with tempfile.TemporaryDirectory(prefix="newsclip-chromium-") as profile:
        command = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                   "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
                   f"--screenshot={png}", f"--window-size={width},{height}", html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="an output folder (with report.html) or a report.html file")
    parser.add_argument("--png", type=Path, help="where to write the PNG (default: report.png beside the report)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=4000, help="window height: the part of the page captured")
    parser.add_argument("--chromium", help="the browser binary (default: $CHROMIUM, else chromium on PATH)")
    args = parser.parse_args(argv)
    try:
        html = report_path(args.target)
        png = screenshot(html, args.png or html.with_suffix(".png"), args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())

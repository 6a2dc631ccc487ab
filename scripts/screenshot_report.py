"""Render an HTML report with headless Chromium and save a PNG screenshot, to check that
the page looks right in a real browser (the report must work offline: every fetch is off).

    python scripts/screenshot_report.py runs/demo/report.html /tmp/report.png [--width 1280 --height 2000]

Needs Chromium (Debian: `apt-get install -y chromium`); `--chromium PATH` picks another
binary. Exits 0 and prints the PNG path, or exits 1 saying what failed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium binary: `explicit`, /usr/bin/chromium, or chromium / chromium-browser /
    google-chrome on PATH; None when there is none."""
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    if Path(DEFAULT_CHROMIUM).exists():
        return DEFAULT_CHROMIUM
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def screenshot(html: str | Path, png: str | Path, width: int = 1280, height: int = 2000,
               chromium: str | None = None, timeout_s: float = 120.0) -> Path:
    """Render `html` (a local file) at `width` x `height` CSS pixels and write `png`.

    Chromium runs headless with a throw-away profile, no sandbox (containers run as
    root), no GPU, and every background network feature off, so a page that tried to
    load something from the internet would show it as missing.
    """
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} does not exist; write it first (vlmalign report RUN_DIR --out {html})")
    binary = find_chromium(chromium)
    if binary is None:
        raise FileNotFoundError("no Chromium found; install it (Debian: apt-get install -y chromium) or pass --chromium PATH")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="vlmalign-chromium-") as profile:
        cmd = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
            f"--window-size={width},{height}", html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"chromium exited with {proc.returncode} and no screenshot at {png}:\n{tail}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("html", help="the report.html to render")
    p.add_argument("png", help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=2000)
    p.add_argument("--chromium", default=None, help=f"browser binary (default {DEFAULT_CHROMIUM} or PATH)")
    args = p.parse_args(argv)
    try:
        out = screenshot(args.html, args.png, args.width, args.height, args.chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot failed: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

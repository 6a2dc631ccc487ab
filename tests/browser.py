"""Shared by the browser tests: find Debian's Chromium, and skip, or fail in CI, when a
browser test cannot run.

`.ci/run` sets VLMALIGN_REQUIRE_BROWSER=1 after installing Chromium, so there a missing
browser (or Playwright, or Gradio) fails the test instead of skipping it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

DEBIAN_CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> str | None:
    if Path(DEBIAN_CHROMIUM).exists():
        return DEBIAN_CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser(*modules: str) -> str:
    """The Chromium binary; when it (or one of `modules`) is missing: a failure if
    VLMALIGN_REQUIRE_BROWSER=1, else a skip naming what to install."""
    missing = [] if chromium_path() else ["chromium (apt-get install -y chromium)"]
    missing += [f"{m} (pip install -e '.[test]')" for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        message = f"needs {', '.join(missing)}"
        if os.environ.get("VLMALIGN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"VLMALIGN_REQUIRE_BROWSER=1 but this browser test {message}")
        pytest.skip(message)
    return chromium_path()

"""Headless Chromium for the UI tests: Debian's /usr/bin/chromium driven by Playwright, never a downloaded browser.

Playwright (a dev extra) talks to the system Chromium through ``executable_path``; ``playwright install`` is
never run. The machines have no internet, so Chromium runs with every background fetch turned off and a
fresh profile per session. A missing Chromium or Playwright fails the test with the command that fixes it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """$VAEDIST_CHROMIUM, else chromium on PATH; fails (never skips) with how to install it."""
    for candidate in (os.environ.get("VAEDIST_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    pytest.fail(
        "the UI tests need a system Chromium and none was found (looked at $VAEDIST_CHROMIUM, chromium, "
        "chromium-browser): apt-get install -y chromium (.ci/run does this)",
        pytrace=False,
    )


@contextlib.contextmanager
def chromium_page(profile: Path, width: int = 1600, height: int = 1100, timeout_s: float = 120) -> Iterator:
    """A Playwright Page in headless Chromium with a fresh profile folder; closed on exit."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the UI tests need Playwright for Python (a dev extra): pip install -c constraints.txt -e '.[dev]' "
            "(the browser is the system Chromium; never run 'playwright install')",
            pytrace=False,
        )
    executable = chromium_path()
    profile.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=executable,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            yield page
        finally:
            context.close()

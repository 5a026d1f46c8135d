"""Headless Chromium (Debian's /usr/bin/chromium) driven by playwright's sync API in a worker thread,
while the real server runs on the test's trio loop. Screenshots go to test-artifacts/ at the repo root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.paths import REPO

ARTIFACTS = REPO / "test-artifacts"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("KTULHU_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("Chromium not found: install it with `make browser` (apt-get install chromium)")
    return path


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS

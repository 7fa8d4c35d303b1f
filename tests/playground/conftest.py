"""Browser tests of the playground (GET /): headless Chromium from Debian's packages, driven by Selenium.

Each module starts the real service (``python -m service``) on a loopback ephemeral port with the
tiny bundle (which carries model.attention.onnx) and the fake engine slowed to one token per
TEXTGEN_FAKE_STEP_S, so a stream lasts long enough to be watched and stopped; /v1/inspect runs
the bundle's real inspection graph in the HTTP process either way. Chromium is started by the
tests themselves (browser.py). Without ``chromium``, ``chromium-driver`` or the ``selenium`` package
the tests skip with a message naming what is missing (``apt-get install chromium chromium-driver``,
the dev extra), and fail instead when CI=true. Synchronisation is WebDriverWait with deadlines, no
sleeps. Screenshots of each view go to artifacts/playground/ (git-ignored); docs/img/ holds copies
made by capture_docs.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from browser import missing, start_chromium


def require_browser() -> None:
    why = missing()
    if why is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests cannot run in CI: {why}")
    pytest.skip(f"browser tests skipped: {why}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "browser" in item.fixturenames:  # before any fixture: nothing is built or started for a skip
        require_browser()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()

"""Headless Chromium for the playground: start it, wait for the page, read its logs, take screenshots.

Used by the tests (conftest.py) and by capture_docs.py. Needs Debian's ``chromium`` and
``chromium-driver`` and the ``selenium`` package; ``missing()`` names whichever is absent.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))  # server_harness, as tests/service imports it

import server_harness  # noqa: E402

ARTIFACTS = ROOT / "artifacts" / "playground"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DEADLINE_S = 30


def missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the Python package 'selenium' is not installed (pip install -e '.[dev]')"
    if not any(shutil.which(c) for c in CHROMIUM):
        return "the Debian package 'chromium' is not installed (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "the Debian package 'chromium-driver' is not installed (apt-get install chromium-driver)"
    return None


def start_server(bundle: Path, tmp: Path, **settings: str) -> server_harness.Server:
    """The service with the fake engine at one token per 50 ms (a stream long enough to watch and stop)."""
    return server_harness.start(bundle, tmp / "server.log", fake=True, TEXTGEN_FAKE_STEP_S="0.05", **settings)


def start_chromium(width: int = 1360, height: int = 1240):
    """A headless Chromium with the browser console and network (performance) logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = next(shutil.which(c) for c in CHROMIUM if shutil.which(c))
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(DEADLINE_S)
    return driver


def wait(driver, condition, timeout: float = DEADLINE_S, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def open_page(driver, server) -> None:
    driver.get(server.url("/"))
    wait(
        driver,
        lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true",
        message="the page did not finish starting",
    )


def console_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver) -> list[str]:
    """Every URL the page asked the network for since the last call (CDP Network events)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path

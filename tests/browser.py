"""A real browser for the dashboard tests: Debian's chromium, driven by selenium through Debian's
chromedriver. Nothing is downloaded (selenium is given both paths, so its manager never runs).

Screenshots go to `.test-cache/screenshots/` (or $EXOCTL_TEST_ARTIFACTS); the run's summary
prints the folder (conftest).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.conftest import ARTIFACTS

CHROMIUM = ("/usr/bin/chromium", "/usr/lib/chromium/chromium")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


def _first(paths: tuple[str, ...], name: str) -> str:
    for path in (*paths, shutil.which(name) or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise AssertionError(
        f"{name} is not installed: the dashboard tests need it ({INSTALL}; .ci/run does this)"
    )


@contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _first(CHROMIUM, "chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",  # the tests talk to 127.0.0.1 only
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    # the console, failed requests included ("Failed to load resource: ... 404"), read by `errors`
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_first(CHROMEDRIVER, "chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    viewport(driver, width, height)
    try:
        yield driver
    finally:
        driver.quit()


def viewport(driver: Any, width: int, height: int) -> None:
    """The page's own size (--window-size counts the browser's frame too)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


def console_errors(driver: Any) -> list[str]:
    """Console errors and failed requests since the last call."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(path))
    return path


def until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """`predicate()` once it is truthy; after `timeout` seconds, an assertion naming `what`."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # an element replaced while it was read: the page redraws each second
            last = exc
        time.sleep(interval)
    raise AssertionError(f"after {timeout} s: {what}" + (f" (last error: {last!r})" if last else ""))

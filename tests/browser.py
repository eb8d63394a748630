"""A real headless browser for the /ui tests: Debian's chromium through chromium-driver, driven with selenium.

The app it opens is served on a real loopback port (`tests.served`), since the
browser is another process. Where chromium is not installed the tests skip,
except in CI (`CI` set), where `.ci/run` installs it and a missing one fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.processes import program


@contextmanager
def chromium() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = program("chromium", "/usr/bin/chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver named explicitly: selenium would otherwise look for one online.
    service = Service(program("chromedriver", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: WebDriver) -> list[str]:
    """The console's errors since the last call (a CSP violation, an uncaught exception, a failed load)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]

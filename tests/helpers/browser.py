"""Debian's headless Chromium, driven by its chromedriver through selenium, for the page's
tests: a browser with the page's console log kept, and a wait on what the page shows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def chromium(profile: Path) -> webdriver.Chrome:
    path, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (path and driver):
        pytest.fail("chromium and chromedriver are missing: scripts/setup.sh --test installs them "
                    "(apt-get install chromium chromium-driver)")
    o = webdriver.ChromeOptions()
    o.binary_location = path
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--window-size=1400,2600", f"--user-data-dir={profile}"):
        o.add_argument(flag)
    return webdriver.Chrome(options=o, service=Service(driver))


def wait(driver, condition, what: str, timeout: float = 30.0):
    """condition(driver)'s first true value; fails naming `what`, with the page's text."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1,  # the page redraws what it shows as changes come
                             ignored_exceptions=[StaleElementReferenceException]).until(condition)
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "main").text
        raise AssertionError(f"the page did not show {what} within {timeout} s; it shows:\n{page}") from None


def texts(driver, css: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, css)]

"""The page's tests share a headless Chromium fixture (tests/helpers/browser.py)."""

from __future__ import annotations

import pytest

from tests.helpers.browser import chromium


@pytest.fixture
def browser(tmp_path):
    driver = chromium(tmp_path / "chromium-profile")
    yield driver
    driver.quit()

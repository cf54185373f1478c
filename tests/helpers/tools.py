"""Command-line tools the tests run (promtool, amtool, Alertmanager)."""

from __future__ import annotations

import shutil

import pytest


def require_tool(*names: str) -> str:
    """Path of the first of `names` on PATH. `scripts/setup.sh --test` installs every tool
    the tests use, so a missing one fails the test instead of skipping it."""
    for name in names:
        if path := shutil.which(name):
            return path
    pytest.fail(f"{' or '.join(names)} is not installed (scripts/setup.sh --test installs it)")

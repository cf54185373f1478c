"""What several test folders share: models made for tests, waiting on conditions,
reading topics, tools on PATH, the webhook receiver. Nothing here is a test, and no
test module imports another; they import from here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

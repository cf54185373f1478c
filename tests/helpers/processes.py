"""`vigil` commands run by tests as child processes, their output in a log file: waiting
for a line of that log."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path


def log_match(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
    """The first match of the regular expression `pattern` in `proc`'s log; fails, with the
    log's end, if the process exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not (m := re.search(pattern, text := log.read_text())):
        assert proc.poll() is None, f"{log.name}: exited with {proc.returncode}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in {log.name} within {timeout}s:\n{text[-3000:]}"
        time.sleep(0.05)
    return m

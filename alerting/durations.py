"""Durations written back as Prometheus writes them ("1h30m", "5m", "250ms", "0s"; the
parser is eventbus.durations), and times written as Go writes RFC 3339 (what
Alertmanager's JSON carries)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

from eventbus.durations import UNITS


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    ms = int(round(seconds * 1000))
    out = []
    for unit, mult in UNITS:
        n = int(ms // round(mult * 1000))
        if n:
            out.append(f"{n}{unit}")
            ms -= n * int(round(mult * 1000))
    return "".join(out)


GO_ZERO_TIME = "0001-01-01T00:00:00Z"


def rfc3339(ts: float | None) -> str:
    """Go's time.RFC3339Nano in UTC: fractional seconds without trailing zeros."""
    if ts is None:
        return GO_ZERO_TIME
    dt = datetime.fromtimestamp(ts, tz=timezone.utc)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        base += ("." + f"{dt.microsecond:06d}").rstrip("0")
    return base + "Z"


def parse_rfc3339(text: str) -> float | None:
    if not text or text.startswith("0001-01-01"):
        return None
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    # Python's fromisoformat takes at most 6 fractional digits; Go writes up to 9.
    m = re.match(r"^(.*?\.\d{6})\d*(.*)$", t)
    if m:
        t = m.group(1) + m.group(2)
    return datetime.fromisoformat(t).timestamp()

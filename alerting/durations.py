"""Durations written as Prometheus writes them ("1h30m", "5m", "250ms", "0s"), and times
written as Go writes RFC 3339 (what Alertmanager's JSON carries)."""

from __future__ import annotations

import re
from datetime import datetime, timezone

_UNITS = (("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0),
          ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(text: str) -> float:
    """Seconds. Raises ValueError with Prometheus's wording for a bad one."""
    if not isinstance(text, str):
        raise ValueError(f"not a duration string: {text!r} (write it as \"5m\", \"30s\", \"1h30m\")")
    if text == "0":
        return 0.0
    m = _DURATION.match(text)
    if not text or not m:
        raise ValueError(f"not a valid duration string: {text!r} (units y w d h m s ms, largest first)")
    return sum(int(g) * mult for g, (_, mult) in zip(m.groups(), _UNITS) if g)


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    ms = int(round(seconds * 1000))
    out = []
    for unit, mult in _UNITS:
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

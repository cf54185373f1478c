"""Durations as Prometheus writes them ("1d2h30m10s", "5m", "500ms", "0"), and, where a
caller allows it, a plain number of seconds. Shared by the alerting rules and
configuration and the rollout controller's response policies."""

from __future__ import annotations

import math
import re

UNITS = (("y", 365 * 86400.0), ("w", 7 * 86400.0), ("d", 86400.0), ("h", 3600.0),
         ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATION = re.compile(r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(text, numbers: bool = False) -> float:
    """Seconds. Raises ValueError with Prometheus's wording for a bad one. With
    `numbers`, an int or float of 0 or more is taken as seconds too."""
    if numbers and isinstance(text, (int, float)) and not isinstance(text, bool):
        if not text >= 0 or math.isinf(text):
            raise ValueError(f"{text!r} is not a duration of 0 or more seconds")
        return float(text)
    if not isinstance(text, str):
        raise ValueError(f"not a duration string: {text!r} (write it as \"5m\", \"30s\", \"1h30m\")")
    if text == "0":
        return 0.0
    m = _DURATION.match(text)
    if not text or not m:
        raise ValueError(f"not a valid duration string: {text!r} (units y w d h m s ms, largest first)")
    return sum(int(g) * mult for g, (_, mult) in zip(m.groups(), UNITS) if g)

"""What every detector shares: the reading a signal is built from, and input cleaning."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Reading:
    """A detector's current verdict, enough to build a ``vigil.signals`` message.

    ``statistic`` is compared against ``threshold`` (drift when it reaches it) or, for the
    tests with a p-value, ``p_value`` against ``threshold`` (drift when below it).
    ``window_sizes`` are the sample sizes the verdict rests on, in the detector's own
    order (for example reference then current window).
    """

    detector: str
    statistic: float
    threshold: float
    p_value: float | None
    drifted: bool
    window_sizes: tuple[int, ...]
    n_detections: int

    def as_dict(self) -> dict:
        return asdict(self)


def as_float_array(xs) -> np.ndarray:
    """A 1-d float64 view of ``xs`` (no copy when it already is one)."""
    a = np.asarray(xs, dtype=np.float64)
    return a.reshape(-1)


def finite_positions(a: np.ndarray) -> np.ndarray | None:
    """Indices of the finite entries of ``a``, or None when all are finite."""
    ok = np.isfinite(a)
    if ok.all():
        return None
    return np.flatnonzero(ok)


def is_finite(x) -> bool:
    try:
        return math.isfinite(x)
    except TypeError:
        return False

"""Mann-Kendall trend test with Sen's slope, for slow drifts in windowed statistics.

Given a series x_0 .. x_{n-1} (say, a feature's mean per window, or the ECE per window):

    S = sum over i < j of sign(x_j - x_i)
    Var(S) = [n(n-1)(2n+5) - sum over tie groups t of t(t-1)(2t+5)] / 18
    Z = (S - 1)/sqrt(Var S) if S > 0, (S + 1)/sqrt(Var S) if S < 0, else 0
    p = 2 (1 - Phi(|Z|))                          (two-sided)

Kendall's tau is S / (n(n-1)/2). Sen's slope is the median of (x_j - x_i) / (j - i) over
i < j, with intercept median(x) - slope (n-1)/2 (as ``scipy.stats.theilslopes``).

Severity, so a slow drift is graded rather than only flagged: "none" unless p < alpha;
otherwise the change across the series, |slope| (n - 1), is measured against the noise
around the trend line (1.4826 x the median absolute deviation of the residuals, or
``scale`` when given): under 1 noise sd "low", under 2 "medium", else "high".
"""

from __future__ import annotations

import math
from collections import deque
from functools import lru_cache
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["TrendResult", "mann_kendall", "TrendMonitor"]


@dataclass(frozen=True)
class TrendResult:
    n: int
    s: int
    var_s: float
    z: float
    p_value: float
    tau: float
    slope: float
    intercept: float
    trend: str          # "increasing", "decreasing" or "no trend"
    severity: str       # "none", "low", "medium" or "high"
    magnitude: float    # |slope| (n - 1) in units of the residual noise

    def as_dict(self) -> dict:
        return asdict(self)


def mann_kendall(values, alpha: float = 0.05, scale: float | None = None) -> TrendResult:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 3:
        return TrendResult(n, 0, 0.0, 0.0, 1.0, 0.0, 0.0, float(np.median(x)) if n else math.nan,
                           "no trend", "none", 0.0)
    i, j = _pairs(n)
    d = x[j] - x[i]
    s = int(np.sign(d).sum())
    _, t = np.unique(x, return_counts=True)
    var_s = (n * (n - 1) * (2 * n + 5) - float(np.sum(t * (t - 1) * (2 * t + 5)))) / 18.0
    if var_s <= 0:
        z = 0.0
    elif s > 0:
        z = (s - 1) / math.sqrt(var_s)
    elif s < 0:
        z = (s + 1) / math.sqrt(var_s)
    else:
        z = 0.0
    p = math.erfc(abs(z) / math.sqrt(2.0))
    tau = s / (n * (n - 1) / 2.0)
    slope = _median(d / (j - i))
    intercept = _median(x) - slope * (n - 1) / 2.0
    resid = x - slope * np.arange(n)
    if scale is None:
        scale = 1.4826 * _median(np.abs(resid - _median(resid)))
        if scale == 0.0:
            scale = float(np.std(resid))
    change = abs(slope) * (n - 1)
    magnitude = change / scale if scale > 0 else (math.inf if change > 0 else 0.0)
    significant = p < alpha
    trend = ("increasing" if s > 0 else "decreasing") if significant else "no trend"
    if not significant:
        severity = "none"
    elif magnitude < 1.0:
        severity = "low"
    elif magnitude < 2.0:
        severity = "medium"
    else:
        severity = "high"
    return TrendResult(n, s, var_s, z, p, tau, slope, intercept, trend, severity, magnitude)


@lru_cache(maxsize=64)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) over all i < j < n."""
    return np.triu_indices(n, k=1)


def _median(v: np.ndarray) -> float:
    """numpy.median's value (the mean of the middle two for an even count), without its overhead."""
    s = np.sort(v)
    m = len(s) // 2
    return float(s[m]) if len(s) % 2 else float((s[m - 1] + s[m]) / 2)


class TrendMonitor:
    """Mann-Kendall over the last ``window`` values of a windowed statistic."""

    def __init__(self, window: int = 30, alpha: float = 0.05, min_points: int = 8,
                 scale: float | None = None):
        if window < 3 or min_points < 3:
            raise ValueError("window and min_points must be >= 3")
        self.window = int(window)
        self.alpha = float(alpha)
        self.min_points = int(min_points)
        self.scale = scale
        self._values: deque[float] = deque(maxlen=self.window)
        self.last: TrendResult | None = None

    def update(self, value: float) -> TrendResult | None:
        """Add a point; returns the test over the window once it has ``min_points``."""
        if not math.isfinite(value):
            return self.last
        self._values.append(float(value))
        if len(self._values) < self.min_points:
            return None
        self.last = mann_kendall(self._values, self.alpha, self.scale)
        return self.last

    def to_state(self) -> dict:
        return {"window": self.window, "alpha": self.alpha, "min_points": self.min_points,
                "scale": self.scale, "values": list(self._values)}

    @classmethod
    def from_state(cls, st: dict) -> "TrendMonitor":
        m = cls(st["window"], st["alpha"], st["min_points"], st["scale"])
        for v in st["values"]:
            m.update(v)
        return m

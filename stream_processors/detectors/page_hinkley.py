"""Page-Hinkley test: a CUSUM of deviations from the running mean.

    m_t   = running mean of the values since the last reset
    U_t   = alpha * U_{t-1} + (x_t - m_t) - delta        (for increases)
    L_t   = alpha * L_{t-1} + (x_t - m_t) + delta        (for decreases)

A change is declared, once ``min_instances`` values have been seen, when
``U_t - min(U)`` or ``max(L) - L_t`` exceeds ``threshold`` (lambda). The arithmetic and its
order, the ``mode`` (up, down, both) and the reset at the update after a detection follow
river's ``drift.PageHinkley``, so both detect at the same indices on the same data.
"""

from __future__ import annotations

import numpy as np

from .base import FloatDetector, Reading

__all__ = ["PageHinkley"]


class PageHinkley(FloatDetector):
    """Page-Hinkley change detector.

    Parameters
    ----------
    min_instances
        Values seen (since the last reset) before a change can be declared.
    delta
        Magnitude of change tolerated.
    threshold
        Lambda: the cumulative deviation that declares a change.
    alpha
        Forgetting factor of the cumulative sums.
    mode
        "up", "down" or "both": which direction of change to look for.

    Examples
    --------
    A thousand values from {0, 1}, then a thousand from {4, ..., 7}:

    >>> import random
    >>> rng = random.Random(12345)
    >>> stream = rng.choices([0, 1], k=1000) + rng.choices(range(4, 8), k=1000)
    >>> ph = PageHinkley()
    >>> for i, x in enumerate(stream):
    ...     ph.update(x)
    ...     if ph.drift_detected:
    ...         print(f"Change detected at index {i}, input value: {x}")
    Change detected at index 1006, input value: 5

    The same, a batch at a time:

    >>> PageHinkley().update_many(stream)
    array([1006])
    """

    name = "page_hinkley"

    def __init__(self, min_instances: int = 30, delta: float = 0.005, threshold: float = 50.0,
                 alpha: float = 1 - 0.0001, mode: str = "both"):
        if mode not in ("up", "down", "both"):
            raise ValueError(f"mode must be 'up', 'down' or 'both', got {mode!r}")
        super().__init__()
        self.min_instances = int(min_instances)
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.mode = mode
        self._clear()

    def _clear(self) -> None:
        self._n = 0.0
        self._mean = 0.0
        self._sum_increase = 0.0
        self._sum_decrease = 0.0
        self._min_increase = float("inf")
        self._max_decrease = -1.0          # river starts it at -1, not -inf
        self._reset_pending = False

    def _update(self, x: float) -> None:
        if self._reset_pending:
            self._clear()
        self._n += 1.0
        self._mean += (1.0 / self._n) * (x - self._mean)
        dev = x - self._mean
        self._sum_increase = self.alpha * self._sum_increase + dev - self.delta
        self._sum_decrease = self.alpha * self._sum_decrease + dev + self.delta
        if self._sum_increase < self._min_increase:
            self._min_increase = self._sum_increase
        if self._sum_decrease > self._max_decrease:
            self._max_decrease = self._sum_decrease
        drift = False
        if self._n >= self.min_instances:
            up = self._sum_increase - self._min_increase
            down = self._max_decrease - self._sum_decrease
            if self.mode == "up":
                drift = up > self.threshold
            elif self.mode == "down":
                drift = down > self.threshold
            else:
                drift = up > self.threshold or down > self.threshold
        self._flag(drift)
        self._reset_pending = drift

    def _update_many(self, a: np.ndarray) -> np.ndarray:
        """``_update`` on each value, in one loop over local variables (the recursion is sequential)."""
        n, mean = self._n, self._mean
        si, sd = self._sum_increase, self._sum_decrease
        mi, md = self._min_increase, self._max_decrease
        alpha, delta, thr, mn = self.alpha, self.delta, self.threshold, self.min_instances
        up_on, down_on = self.mode in ("up", "both"), self.mode in ("down", "both")
        drift = self._reset_pending
        hits = []
        for i, x in enumerate(a.tolist()):
            if drift:
                n, mean, si, sd, mi, md = 0.0, 0.0, 0.0, 0.0, float("inf"), -1.0
            n += 1.0
            mean += (1.0 / n) * (x - mean)
            dev = x - mean
            si = alpha * si + dev - delta
            sd = alpha * sd + dev + delta
            if si < mi:
                mi = si
            if sd > md:
                md = sd
            drift = n >= mn and ((up_on and si - mi > thr) or (down_on and md - sd > thr))
            if drift:
                hits.append(i)
        self._n, self._mean = n, mean
        self._sum_increase, self._sum_decrease = si, sd
        self._min_increase, self._max_decrease = mi, md
        self._reset_pending = drift
        if len(a):
            self._drift = drift
        self.n_detections += len(hits)
        return np.asarray(hits, dtype=np.int64)

    @property
    def n(self) -> int:
        """Values since the last reset."""
        return int(self._n)

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def test_increase(self) -> float:
        return self._sum_increase - self._min_increase if self._n else 0.0

    @property
    def test_decrease(self) -> float:
        return self._max_decrease - self._sum_decrease if self._n else 0.0

    @property
    def statistic(self) -> float:
        """The test value compared with the threshold (the larger one in mode "both")."""
        if not self._n:
            return 0.0
        if self.mode == "up":
            return self.test_increase
        if self.mode == "down":
            return self.test_decrease
        return max(self.test_increase, self.test_decrease)

    def reading(self) -> Reading:
        return Reading(self.name, self.statistic, self.threshold, None, self._drift, (self.n,),
                       self.n_detections)

    def _params(self) -> dict:
        return {"min_instances": self.min_instances, "delta": self.delta, "threshold": self.threshold,
                "alpha": self.alpha, "mode": self.mode}

    def _state(self) -> dict:
        return {"n": self._n, "mean": self._mean, "sum_increase": self._sum_increase,
                "sum_decrease": self._sum_decrease, "min_increase": self._min_increase,
                "max_decrease": self._max_decrease}

    def _load(self, state: dict) -> None:
        self._n, self._mean = float(state["n"]), float(state["mean"])
        self._sum_increase, self._sum_decrease = float(state["sum_increase"]), float(state["sum_decrease"])
        self._min_increase, self._max_decrease = float(state["min_increase"]), float(state["max_decrease"])
        # A restart is due if the last value detected: the state still is the one that detected.
        self._reset_pending = self._n >= self.min_instances and self.statistic > self.threshold

"""What every detector shares: parameter checks, the drift flag and its count, the reading a
signal is built from, the shape of a checkpoint, and (for detectors of numbers) skipping
values that are not finite."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Self

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


def check(name: str, value, low, high=None) -> None:
    """Raise ValueError naming the parameter unless ``value >= low`` or, when ``high`` is given,
    ``low < value < high``."""
    if high is None:
        if not value >= low:
            raise ValueError(f"{name} must be >= {low}, got {value!r}")
    elif not low < value < high:
        raise ValueError(f"{name} must be in ({low}, {high}), got {value!r}")


def as_float_array(xs) -> np.ndarray:
    """A 1-d float64 view of ``xs`` (no copy when it already is one)."""
    a = np.asarray(xs, dtype=np.float64)
    return a.reshape(-1)


class Detector(ABC):
    """A drift detector: ``update(x)``, ``update_many(xs)``, ``drift_detected``, ``statistic``,
    ``reading()`` and checkpoints through ``to_state()`` / ``from_state()``.

    ``drift_detected`` is true right after the update that detected a change, and
    ``n_detections`` counts those updates. A checkpoint is a plain JSON-able dict: the
    constructor's arguments under ``"params"``, ``"drift"``, ``"n_detections"``, and what the
    detector adds (``_state`` / ``_load``).
    """

    name: str

    def __init__(self) -> None:
        self.n_detections = 0
        self._drift = False

    @property
    def drift_detected(self) -> bool:
        """True right after the update that detected a change."""
        return self._drift

    def _flag(self, drift: bool) -> None:
        self._drift = drift
        if drift:
            self.n_detections += 1

    @abstractmethod
    def update(self, x) -> None:
        """Add one value; afterwards ``drift_detected`` tells whether it revealed a change."""

    @abstractmethod
    def update_many(self, xs) -> np.ndarray:
        """As ``update`` on each value in turn; returns the positions whose update detected a change."""

    @property
    @abstractmethod
    def statistic(self) -> float:
        """The value the detector's verdict rests on."""

    @abstractmethod
    def reading(self) -> Reading:
        """The current verdict, as a signal carries it."""

    def to_state(self) -> dict:
        return {"params": self._params(), **self._state(), "drift": self._drift, "n_detections": self.n_detections}

    @classmethod
    def from_state(cls, state: dict) -> Self:
        d = cls(**state["params"])
        d._load(state)
        d._drift, d.n_detections = bool(state["drift"]), int(state["n_detections"])
        return d

    @abstractmethod
    def _params(self) -> dict:
        """The constructor's arguments."""

    @abstractmethod
    def _state(self) -> dict:
        """What a checkpoint holds besides the parameters and the drift flag and count."""

    @abstractmethod
    def _load(self, state: dict) -> None:
        """Take back what ``_state`` gave, on a detector made from the same parameters."""


class FloatDetector(Detector):
    """A detector of numbers: a value that is not a finite number is skipped (and clears
    ``drift_detected``). Subclasses define ``_update`` and ``_update_many`` on finite values."""

    def update(self, x) -> None:
        try:
            finite = math.isfinite(x)
        except TypeError:
            finite = False
        if finite:
            self._update(float(x))
        else:
            self._drift = False

    def update_many(self, xs, on_drift: Callable[[int], None] | None = None) -> np.ndarray:
        """As ``update`` on each value in turn; returns the positions in ``xs`` whose update
        detected a change. ``on_drift`` is for the detectors whose ``_update_many`` takes it
        (ADWIN): it is called with each such position right after its update, when the
        detector reads as ``update`` left it."""
        a = as_float_array(xs)
        ok = np.isfinite(a)
        if ok.all():
            return self._update_many(a) if on_drift is None else self._update_many(a, on_drift)
        keep = np.flatnonzero(ok)
        if on_drift is None:
            hits = self._update_many(a[keep])
        else:
            hits = self._update_many(a[keep], lambda i: on_drift(int(keep[i])))
        if not ok[-1]:
            self._drift = False
        return keep[hits]

    @abstractmethod
    def _update(self, x: float) -> None:
        """``update`` of a finite value."""

    @abstractmethod
    def _update_many(self, a: np.ndarray) -> np.ndarray:
        """``update_many`` of finite values: the positions in ``a`` that detected a change."""

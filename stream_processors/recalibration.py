"""A temperature for a version's label probabilities, fitted on its joined feedback and
checked on pairs it was not fitted on.

The window of joined pairs (probabilities, index of the true label), oldest first, is cut
in two: the older ``1 - held_out`` share fits the temperature (the one that minimises the
negative log-likelihood of the true labels, ``eventbus/temperature.py`` for what it does
to probabilities), the newer share judges it: ECE and accuracy on those pairs before and
after scaling. The fit is offered only when it lowers the held-out ECE; scaling never
changes the top label, so accuracy stays as it was.

>>> import random
>>> rng = random.Random(0)
>>> pairs = []
>>> for _ in range(3000):   # says 0.95, right 70 percent of the time
...     top = rng.randrange(2)
...     pairs.append(([0.95, 0.05] if top == 0 else [0.05, 0.95], top if rng.random() < 0.7 else 1 - top))
>>> fit = fit_temperature(pairs)
>>> fit.temperature > 1 and fit.ece_after < fit.ece_before / 3
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from eventbus.temperature import log_probs, scale_rows
from stream_processors.calibration import top_label_ece

__all__ = ["Fit", "fit_temperature"]

LOG_T_BOUNDS = (-3.0, 3.0)   # temperatures from 0.05 to 20


@dataclass(frozen=True)
class Fit:
    temperature: float
    ece_before: float       # on the held-out pairs, as they were
    ece_after: float        # on the held-out pairs, scaled
    accuracy: float         # on the held-out pairs (the same before and after)
    fitted: int             # pairs the temperature was fitted on
    held_out: int


def _matrix(pairs) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities padded with NaN to the widest row, and the true labels."""
    k = max(len(p) for p, _ in pairs)
    P = np.full((len(pairs), k), np.nan)
    for i, (p, _) in enumerate(pairs):
        P[i, :len(p)] = p
    return P, np.array([y for _, y in pairs], dtype=np.int64)


def _nll(L: np.ndarray, y: np.ndarray, log_t: float) -> float:
    z = L / np.exp(log_t)
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(pairs, held_out: float = 1 / 3, bins: int = 10) -> Fit:
    """Fit on the older pairs, judge on the newer ``held_out`` share."""
    cut = len(pairs) - max(1, int(len(pairs) * held_out))
    P, y = _matrix(pairs)
    L = log_probs(P)
    best = minimize_scalar(lambda t: _nll(L[:cut], y[:cut], t), bounds=LOG_T_BOUNDS, method="bounded")
    t = float(np.exp(best.x))
    before, accuracy = top_label_ece(P[cut:], y[cut:], bins)
    after, _ = top_label_ece(scale_rows(P[cut:], t), y[cut:], bins)
    return Fit(t, before, after, accuracy, cut, len(pairs) - cut)

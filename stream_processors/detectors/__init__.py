"""Drift detectors, shaped like river's: ``update(x)``, ``drift_detected``, readable state.

Each also has ``update_many(xs)`` (the same results as ``update`` on each value, returning
the positions that detected a change), ``reading()`` (statistic, threshold, p-value,
verdict, window sizes: what a signal carries) and ``to_state()`` / ``from_state()`` for
checkpoints (plain JSON-able dicts).

- ``ADWIN``: adaptive window over an exponential histogram; mean changes.
- ``PageHinkley``: CUSUM of deviations from the running mean.
- ``KSWindow``: two-sample Kolmogorov-Smirnov, reference vs. sliding window.
- ``PSI``: population stability index over fixed bins.
- ``ChiSquare``: chi-square homogeneity test for categories.

The first two are change detectors: they fire once and restart from the next value. The
last three compare against a fixed reference: they are ``rejecting`` while the window
differs, and ``drift_detected`` marks the update where that starts.
"""

from .adwin import ADWIN
from .base import Reading
from .chi2 import ChiSquare
from .ks import KSWindow, ks_2samp_pvalue
from .page_hinkley import PageHinkley
from .psi import PSI, psi

__all__ = ["ADWIN", "ChiSquare", "KSWindow", "PSI", "PageHinkley", "Reading", "ks_2samp_pvalue", "psi"]

"""Drift detectors, shaped like river's: ``update(x)``, ``drift_detected``, readable state.

Each also has ``update_many(xs)`` (the same results as ``update`` on each value, returning
the positions that detected a change), ``reading()`` (statistic, threshold, p-value,
verdict, window sizes: what a signal carries) and ``to_state()`` / ``from_state()`` for
checkpoints (plain JSON-able dicts). What they share (parameter checks, the drift flag and
its count, the checkpoint's shape, skipping values that are not finite numbers) is in
``base.Detector``; each module shows the detector's one-value update, then the batch one.

- ``ADWIN``: adaptive window over an exponential histogram; mean changes.
- ``PageHinkley``: CUSUM of deviations from the running mean.
- ``KSWindow``: two-sample Kolmogorov-Smirnov, reference vs. sliding window.
- ``PSI``: population stability index over fixed bins.
- ``ChiSquare``: chi-square homogeneity test for categories.

``ks_2samp`` and ``chi2_homogeneity`` are the same two tests on two samples given whole
(one version of a model against another).

The first two are change detectors: they fire once and restart from the next value. The
last three compare against a fixed reference: they are ``rejecting`` while the window
differs, and ``drift_detected`` marks the update where that starts.
"""

from .adwin import ADWIN
from .base import Reading
from .chi2 import ChiSquare, chi2_homogeneity
from .ks import KSWindow, ks_2samp, ks_2samp_pvalue
from .page_hinkley import PageHinkley
from .psi import PSI, psi

__all__ = ["ADWIN", "ChiSquare", "KSWindow", "PSI", "PageHinkley", "Reading", "chi2_homogeneity", "ks_2samp",
           "ks_2samp_pvalue", "psi"]

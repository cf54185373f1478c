"""Accuracy, Brier score, ECE (equal width and equal mass) and reliability data against a
direct computation over the same window."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors.calibration import Calibration


def direct(P: np.ndarray, Y: np.ndarray, n_bins: int, strategy: str):
    """Straight from the definitions, no shared code."""
    if P.ndim == 1:
        pred = (P > 0.5).astype(int)
        conf = np.maximum(P, 1 - P)
        brier = (P - Y) ** 2
    else:
        pred = P.argmax(1)
        conf = P[np.arange(len(Y)), pred]
        brier = ((P - np.eye(P.shape[1])[Y]) ** 2).sum(1)
    correct = (pred == Y).astype(float)
    if strategy == "width":
        b = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
        groups = [np.flatnonzero(b == k) for k in range(n_bins)]
    else:
        groups = np.array_split(np.argsort(conf, kind="stable"), n_bins)
    ece = sum(len(g) / len(Y) * abs(correct[g].mean() - conf[g].mean()) for g in groups if len(g))
    return correct.mean(), brier.mean(), ece


def make(seed: int, n: int, k: int | None):
    rng = np.random.default_rng(seed)
    if k is None:
        P = rng.uniform(size=n)
        Y = (rng.uniform(size=n) < P ** 1.5).astype(int)        # a miscalibrated model
    else:
        P = rng.dirichlet(np.ones(k) * 0.7, size=n)
        Y = np.array([rng.choice(k, p=p) for p in P ** 2 / (P ** 2).sum(1, keepdims=True)])
    return P, Y


@pytest.mark.parametrize("k", [None, 3, 5])
def test_matches_direct_computation_over_the_window(k):
    P, Y = make(0, 4000, k)
    W, B = 900, 10
    cal = Calibration(n_bins=B, window_size=W)
    for i in range(len(Y)):
        cal.update(P[i], Y[i])
        if i % 499 == 0 or i == len(Y) - 1:
            s = slice(max(0, i + 1 - W), i + 1)
            for strategy in ("width", "mass"):
                acc, brier, ece = direct(P[s], Y[s], B, strategy)
                assert abs(cal.accuracy - acc) < 1e-12
                assert abs(cal.brier - brier) < 1e-12
                assert abs(cal.ece(strategy) - ece) < 1e-12


@pytest.mark.parametrize("k", [None, 4])
def test_batch_equals_one_by_one_and_checkpoint(k):
    P, Y = make(1, 3000, k)
    one, many = Calibration(15, 700), Calibration(15, 700)
    for i in range(len(Y)):
        one.update(P[i], Y[i])
    for s in range(0, len(Y), 257):
        many.update_many(P[s:s + 257], Y[s:s + 257])
    for a, b in zip(one.summary().values(), many.summary().values()):
        assert abs(a - b) < 1e-12
    back = Calibration.from_state(json.loads(json.dumps(many.to_state())))
    for a, b in zip(back.summary().values(), many.summary().values()):
        assert abs(a - b) < 1e-12
    back.update_many(P[:100], Y[:100])
    many.update_many(P[:100], Y[:100])
    assert abs(back.ece("mass") - many.ece("mass")) < 1e-12


def test_reliability_diagram_data():
    P, Y = make(2, 2000, None)
    cal = Calibration(n_bins=10, window_size=5000)
    cal.update_many(P, Y)
    for strategy in ("width", "mass"):
        bins = cal.reliability(strategy)
        assert sum(b["n"] for b in bins) == 2000
        assert all(b["lower"] <= b["confidence"] <= b["upper"] for b in bins)
        assert abs(sum(b["n"] * abs(b["gap"]) for b in bins) / 2000 - cal.ece(strategy)) < 1e-12
    mass = cal.reliability("mass")
    assert {b["n"] for b in mass} == {200}
    width = cal.reliability("width")
    assert [b["lower"] for b in width] == [0.5, 0.6, 0.7, 0.8, 0.9]   # binary: confidence >= 0.5


def test_perfectly_calibrated_model_has_small_ece():
    rng = np.random.default_rng(3)
    P = rng.uniform(size=200_000)
    Y = (rng.uniform(size=len(P)) < P).astype(int)
    cal = Calibration(n_bins=10, window_size=200_000)
    cal.update_many(P, Y)
    assert cal.ece("width") < 0.01 and cal.ece("mass") < 0.01
    assert abs(cal.brier - 1 / 6) < 0.005           # E[(p - y)^2] = E[p(1-p)] = 1/6


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 1)), min_size=1, max_size=300),
       window=st.integers(1, 120), n_bins=st.integers(1, 12))
def test_windowed_sums_stay_exact(data, window, n_bins):
    P = np.array([d[0] for d in data])
    Y = np.array([d[1] for d in data])
    cal = Calibration(n_bins=n_bins, window_size=window)
    for p, y in zip(P, Y):
        cal.update(p, y)
    s = slice(max(0, len(Y) - window), len(Y))
    for strategy in ("width", "mass"):
        acc, brier, ece = direct(P[s], Y[s], n_bins, strategy)
        assert cal.n == len(Y[s])
        assert abs(cal.accuracy - acc) < 1e-9 and abs(cal.brier - brier) < 1e-9
        assert abs(cal.ece(strategy) - ece) < 1e-9


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 600), window=st.integers(1, 150), n_bins=st.integers(1, 12),
       k=st.sampled_from([None, 2, 3]), digits=st.sampled_from([None, 1, 2]))
def test_batch_is_exactly_one_by_one(seed, n, window, n_bins, k, digits):
    """update_many is update pair by pair, to the last bit (ties in confidence included, where
    the equal-mass bins depend on the window's order)."""
    P, Y = make(seed, n, k)
    if digits is not None:
        P = np.round(P, digits)
    one, many = Calibration(n_bins, window), Calibration(n_bins, window)
    for i in range(n):
        one.update(P[i], Y[i])
    rng = np.random.default_rng(seed)
    lo = 0
    while lo < n:
        hi = lo + int(rng.integers(1, 200))
        many.update_many(P[lo:hi], Y[lo:hi])
        lo = hi
    for strategy in ("width", "mass"):
        assert one.reliability(strategy) == many.reliability(strategy)
        assert one.ece(strategy) == many.ece(strategy)
    assert (one.accuracy, one.brier, one.n_seen) == (many.accuracy, many.brier, many.n_seen)

"""Drift detectors against independent references (river, scipy) on the same data, batch vs.
one-by-one equivalence, checkpoints, and invariants (hypothesis)."""

from __future__ import annotations

import doctest
import importlib
import json
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import drift as river_drift
from scipy import stats

from stream_processors.detectors import (ADWIN, PSI, ChiSquare, KSWindow, PageHinkley, Reading, chi2_homogeneity, ks_2samp,
                                        ks_2samp_pvalue, psi)


def shifted_stream(seed: int, n: int = 12_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, n)
    x[n // 3:] += 0.5                   # abrupt mean shift
    x[2 * n // 3:] *= 2.5               # variance change
    return x


def detections(det, xs, start: int = 0) -> list[int]:
    out = []
    for i, v in enumerate(xs, start):
        det.update(v)
        if det.drift_detected:
            out.append(i)
    return out


def batched(det, xs, sizes=(1, 7, 333, 1000, 4096)) -> list[int]:
    out, i, k = [], 0, 0
    while i < len(xs):
        n = sizes[k % len(sizes)]
        out += (det.update_many(xs[i:i + n]) + i).tolist()
        i += n
        k += 1
    return out


def roundtrip(det):
    return type(det).from_state(json.loads(json.dumps(det.to_state())))


# -- ADWIN ----------------------------------------------------------------------------------

ADWIN_PARAMS = [
    {},
    {"delta": 0.1, "clock": 1},
    {"delta": 0.01, "clock": 7, "max_buckets": 3, "min_window_length": 2, "grace_period": 0},
    {"delta": 0.002, "clock": 16, "max_buckets": 2, "min_window_length": 1, "grace_period": 50},
]


@pytest.mark.parametrize("params", ADWIN_PARAMS)
def test_adwin_matches_river(params):
    xs = shifted_stream(1)
    ours, ref = ADWIN(**params), river_drift.ADWIN(**params)
    ours_hits, ref_hits = [], []
    for i, v in enumerate(xs):
        ours.update(v)
        ref.update(v)
        if ours.drift_detected:
            ours_hits.append(i)
        if ref.drift_detected:
            ref_hits.append(i)
        assert ours.width == ref.width
        assert ours.total == ref.total
        assert ours.estimation == ref.estimation
    assert ref_hits and ours_hits == ref_hits


def test_adwin_matches_river_on_binary_error_stream():
    rng = np.random.default_rng(5)
    errors = np.concatenate([rng.uniform(size=8000) < 0.1, rng.uniform(size=8000) < 0.25]).astype(float)
    ours, ref = ADWIN(delta=0.002), river_drift.ADWIN(delta=0.002)
    assert detections(ours, errors) == detections(ref, errors) != []


@pytest.mark.parametrize("params", ADWIN_PARAMS)
def test_adwin_batch_equals_one_by_one(params):
    xs = shifted_stream(2)
    one, many = ADWIN(**params), ADWIN(**params)
    assert detections(one, xs) == batched(many, xs)
    assert one.to_state() == many.to_state()


def test_adwin_skips_non_finite_values():
    xs = shifted_stream(3, 6000)
    dirty = xs.copy()
    dirty[::97] = np.nan
    clean = ADWIN(clock=4)
    hits_clean = detections(clean, xs[np.isfinite(dirty)])
    keep = np.flatnonzero(np.isfinite(dirty))
    assert batched(ADWIN(clock=4), dirty) == keep[hits_clean].tolist()


def test_adwin_reading_and_checkpoint():
    xs = shifted_stream(4)
    a = ADWIN()
    a.update_many(xs[:5000])
    b = roundtrip(a)
    assert batched(a, xs[5000:]) == batched(b, xs[5000:])
    r = a.reading()
    assert isinstance(r, Reading) and r.detector == "adwin" and r.window_sizes == (a.width,)
    assert r.threshold == 1.0 and r.statistic >= 0.0 and a.n_detections >= 2


def test_adwin_on_drift_sees_the_detector_as_update_left_it():
    xs = shifted_stream(5)
    one, many = ADWIN(), ADWIN()
    after_update = {}
    for i, v in enumerate(xs):
        one.update(v)
        if one.drift_detected:
            after_update[i] = one.reading()
    seen = {}
    for lo in range(0, len(xs), 1500):   # batches above and below the scalar threshold
        for part in (xs[lo:lo + 100], xs[lo + 100:lo + 1500]):
            start = lo if len(part) == 100 else lo + 100
            many.update_many(part, on_drift=lambda i, start=start: seen.setdefault(start + i, many.reading()))
    assert after_update and seen == after_update


def _check_adwin_invariants(a: ADWIN, values_in_window: np.ndarray) -> None:
    rows = a.bucket_rows
    M = a.max_buckets
    assert all(r <= M for r in rows)
    assert all(r >= M - 1 for r in rows[:-1])            # only the top row may be short
    assert a.width == sum(n << i for i, n in enumerate(rows))
    if a.width:
        assert len(rows) <= math.floor(math.log2(a.width)) + 1
        assert a.n_buckets <= M * (math.floor(math.log2(a.width)) + 1)
        assert math.isclose(a.total, float(values_in_window.sum()), rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(a.variance, float(values_in_window.var()), rel_tol=1e-6, abs_tol=1e-9)


def synthetic(seed: int, n: int, shift: float, noise: float, discrete: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, noise, n)
    x[n // 2:] += shift
    return np.round(x) if discrete else x


streams = st.builds(synthetic, seed=st.integers(0, 2**31), n=st.one_of(st.integers(1, 300), st.integers(2000, 5000)),
                    shift=st.sampled_from([0.0, 0.5, 3.0, -20.0]), noise=st.sampled_from([0.0, 1.0, 100.0]),
                    discrete=st.booleans())


@settings(max_examples=40, deadline=None)
@given(xs=streams, max_buckets=st.integers(2, 6), clock=st.integers(1, 40), delta=st.sampled_from([0.002, 0.1, 0.5]))
def test_adwin_invariants(xs, max_buckets, clock, delta):
    a = ADWIN(delta=delta, clock=clock, max_buckets=max_buckets)
    start = 0
    for i, v in enumerate(xs):
        if a._reset_pending:
            start = i
        a.update(v)
        # the window is always the newest `width` values since the last reset
        assert a.width <= i + 1 - start
        if i % 37 == 0 or a.drift_detected:
            _check_adwin_invariants(a, xs[i + 1 - a.width:i + 1])
        else:
            assert all(r <= max_buckets for r in a.bucket_rows)


@settings(max_examples=40, deadline=None)
@given(xs=streams, clock=st.integers(1, 40), cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_adwin_batch_equals_one_by_one_on_any_chunking(xs, clock, cuts):
    one, many = ADWIN(delta=0.1, clock=clock), ADWIN(delta=0.1, clock=clock)
    hits, bounds = [], sorted(set([0, len(xs)] + [c for c in cuts if c < len(xs)]))
    for lo, hi in zip(bounds, bounds[1:]):
        hits += (many.update_many(xs[lo:hi]) + lo).tolist()
    assert detections(one, xs) == hits
    assert one.to_state() == many.to_state()


def test_adwin_memory_is_logarithmic_in_width():
    a = ADWIN(delta=1e-9)             # stationary stream: the window just grows
    xs = np.random.default_rng(6).normal(size=300_000)
    for chunk in np.split(xs, 30):
        a.update_many(chunk)
        assert a.n_buckets <= a.max_buckets * (math.floor(math.log2(a.width)) + 1)
    assert a.width == len(xs) and a.n_buckets < 100


# -- Page-Hinkley ---------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {},
    {"threshold": 20.0, "delta": 0.01, "mode": "up"},
    {"min_instances": 5, "threshold": 10.0, "alpha": 0.99, "mode": "down"},
])
def test_page_hinkley_matches_river(params):
    xs = shifted_stream(7, 20_000)
    ours, ref = PageHinkley(**params), river_drift.PageHinkley(**params)
    hits = detections(ours, xs)
    assert hits and hits == detections(ref, xs)
    assert batched(PageHinkley(**params), xs) == hits
    half = PageHinkley(**params)
    half.update_many(xs[:9000])
    assert (roundtrip(half).update_many(xs[9000:]) + 9000).tolist() == [h for h in hits if h >= 9000]


# -- Kolmogorov-Smirnov ---------------------------------------------------------------------

@pytest.mark.parametrize("n1,n2", [(5, 7), (30, 30), (100, 37), (64, 48), (500, 200), (1, 13)])
def test_ks_pvalue_matches_scipy_exact(n1, n2):
    rng = np.random.default_rng(n1 * 1000 + n2)
    for shift in (0.0, 0.3, 0.8, 2.0):
        a, b = rng.normal(size=n1), rng.normal(shift, 1.0, size=n2)
        ref = stats.ks_2samp(a, b)
        g = math.gcd(n1, n2)
        h = round(ref.statistic * (n1 // g * n2))
        assert abs(ks_2samp_pvalue(n1, n2, h) - ref.pvalue) < 1e-6


def test_ks_pvalue_matches_scipy_asymptotic():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=12_000), rng.normal(0.05, 1.0, size=300)
    ref = stats.ks_2samp(a, b)               # max(n) > 10000: asymptotic
    g = math.gcd(12_000, 300)
    h = round(ref.statistic * (12_000 // g * 300))
    assert abs(ks_2samp_pvalue(12_000, 300, h) - ref.pvalue) < 1e-6


@pytest.mark.parametrize("window,ref_size,kind", [(50, 50, "normal"), (40, 70, "integers"), (300, 200, "normal")])
def test_ks_window_matches_scipy(window, ref_size, kind):
    rng = np.random.default_rng(9)
    n = 2500
    xs = rng.normal(size=n) if kind == "normal" else rng.integers(0, 6, size=n).astype(float)
    xs[1300:] += 0.6 if kind == "normal" else 1.0
    det = KSWindow(window_size=window, reference_size=ref_size, alpha=0.01)
    reference = xs[:ref_size]
    for i, v in enumerate(xs):
        det.update(v)
        if i < ref_size or (i - ref_size) % 5:
            continue
        current = xs[max(ref_size, i + 1 - window):i + 1]
        ref = stats.ks_2samp(reference, current)
        assert abs(det.statistic - ref.statistic) <= 1e-12
        assert abs(det.p_value - ref.pvalue) <= 1e-6
        if len(current) == window:
            assert det.rejecting == (ref.pvalue < 0.01)
    one = KSWindow(window_size=window, reference_size=ref_size, alpha=0.01)
    hits = detections(one, xs)
    assert hits and batched(KSWindow(window_size=window, reference_size=ref_size, alpha=0.01), xs) == hits


def test_ks_pinned_reference_and_asymptotic_window():
    rng = np.random.default_rng(10)
    baseline = rng.normal(size=12_000)
    det = KSWindow(window_size=400, reference=baseline, alpha=0.001)
    xs = np.concatenate([rng.normal(size=3000), rng.normal(0.4, 1.0, size=3000)])
    hits = batched(det, xs)
    assert hits and hits[0] > 3000
    ref = stats.ks_2samp(baseline, xs[-400:])
    assert abs(det.statistic - ref.statistic) <= 1e-12 and abs(det.p_value - ref.pvalue) <= 1e-6
    assert det.reading().window_sizes == (12_000, 400)


@pytest.mark.parametrize("n_ref,window,alpha", [(500, 500, 0.005), (300, 200, 0.01), (40, 70, 0.05)])
def test_ks_critical_value_is_the_boundary(n_ref, window, alpha):
    det = KSWindow(window_size=window, reference_size=n_ref, alpha=alpha)
    det.update_many(np.arange(n_ref, dtype=float))
    h = det._h_crit
    assert ks_2samp_pvalue(n_ref, window, h) < alpha <= ks_2samp_pvalue(n_ref, window, h - 1)


def test_ks_verdict_at_every_update_matches_scipy():
    # up, back, down and back again: the detector must notice each start and end of rejecting
    # (it evaluates only where the verdict may change)
    rng = np.random.default_rng(12)
    xs = np.concatenate([rng.normal(size=600), rng.normal(1.0, 1.0, 300), rng.normal(size=300),
                         rng.normal(-1.0, 1.0, 300), rng.normal(size=300)])
    W, alpha = 100, 1e-3
    reference = xs[:W]
    expected = [stats.ks_2samp(reference, xs[i + 1 - W:i + 1]).pvalue < alpha if i >= 2 * W - 1 else False
                for i in range(len(xs))]
    one = KSWindow(window_size=W, alpha=alpha)
    got = []
    for v in xs:
        one.update(v)
        got.append(one.rejecting)
    assert got == expected and sum(np.diff(expected) != 0) >= 4
    many, got = KSWindow(window_size=W, alpha=alpha), []
    for lo in range(0, len(xs), 37):
        many.update_many(xs[lo:lo + 37])
        got.append(many.rejecting)
    assert got == expected[36::37] + ([expected[-1]] if len(xs) % 37 else [])


@pytest.mark.parametrize("n1,n2", [(40, 40), (30, 70), (500, 500), (200, 130), (1, 5)])
def test_ks_2samp_matches_scipy(n1, n2):
    rng = np.random.default_rng(n1 + n2)
    for ties in (False, True):
        a, b = rng.normal(size=n1), rng.normal(0.3, 1.0, size=n2)
        if ties:
            a, b = np.round(a, 1), np.round(b, 1)
        d, p = ks_2samp(a, b)
        ref = stats.ks_2samp(a, b)
        assert abs(d - ref.statistic) <= 1e-12 and abs(p - ref.pvalue) <= 1e-6


def test_ks_checkpoint_continues_identically():
    xs = shifted_stream(11, 6000)
    a = KSWindow(window_size=200, alpha=0.01)
    a.update_many(xs[:2500])
    b = roundtrip(a)
    assert batched(a, xs[2500:]) == batched(b, xs[2500:])
    assert a.statistic == b.statistic


# -- PSI ------------------------------------------------------------------------------------

def test_psi_matches_direct_computation():
    xs = shifted_stream(12, 8000)
    det = PSI(window_size=500, reference_size=1000, n_bins=10, threshold=0.1)
    for i, v in enumerate(xs):
        det.update(v)
        if i >= 1499 and i % 11 == 0:
            e = det.edges
            rc = np.bincount(np.searchsorted(e, xs[:1000], side="left"), minlength=len(e) + 1)
            wc = np.bincount(np.searchsorted(e, xs[i - 499:i + 1], side="left"), minlength=len(e) + 1)
            expected = psi(rc, wc)
            # and by hand, to pin the formula down
            rp, cp = np.maximum(rc / 1000, 1e-4), np.maximum(wc / 500, 1e-4)
            assert math.isclose(expected, float(((cp - rp) * np.log(cp / rp)).sum()), rel_tol=1e-12)
            assert abs(det.statistic - expected) < 1e-12
            assert det.rejecting == (det.statistic >= 0.1)


def test_psi_batch_checkpoint_and_fixed_edges():
    xs = shifted_stream(13, 8000)
    params = {"window_size": 400, "reference_size": 600, "threshold": 0.1}
    hits = detections(PSI(**params), xs)
    assert hits and batched(PSI(**params), xs) == hits
    a = PSI(**params)
    a.update_many(xs[:3000])
    assert (roundtrip(a).update_many(xs[3000:]) + 3000).tolist() == [h for h in hits if h >= 3000]
    fixed = PSI(window_size=100, edges=[-1.0, 0.0, 1.0], reference=np.zeros(10) + 0.5)
    assert fixed.reference_counts.tolist() == [0, 0, 10, 0]
    fixed.update_many(np.full(100, 0.5))
    assert fixed.statistic == 0.0 and not fixed.rejecting


# -- chi-square -----------------------------------------------------------------------------

def finish_reasons(seed: int, n: int, p) -> list[str]:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(["stop", "length", "error", "cancelled"]), size=n, p=p).tolist()


def test_chi_square_matches_scipy():
    ys = finish_reasons(14, 6000, [0.7, 0.2, 0.05, 0.05]) + finish_reasons(15, 6000, [0.6, 0.3, 0.05, 0.05])
    det = ChiSquare(window_size=400, reference_size=1000, alpha=0.001)
    for i, y in enumerate(ys):
        det.update(y)
        if i >= 1399 and i % 17 == 0:
            _, table = det.table()
            ref = stats.chi2_contingency(table)
            assert math.isclose(det.statistic, ref.statistic, rel_tol=1e-12, abs_tol=1e-12)
            assert abs(det.p_value - ref.pvalue) < 1e-12 and det.dof == ref.dof
    hits = detections(ChiSquare(window_size=400, reference_size=1000, alpha=0.001), ys)
    assert hits and hits[0] > 6000
    assert batched(ChiSquare(window_size=400, reference_size=1000, alpha=0.001), ys) == hits


def test_chi_square_two_categories_uses_yates_and_new_categories():
    rng = np.random.default_rng(16)
    ys = rng.choice(["a", "b"], size=2000).tolist()
    det = ChiSquare(window_size=100, reference_size=200)
    for i, y in enumerate(ys):
        det.update(y)
        if i >= 299:
            _, table = det.table()
            ref = stats.chi2_contingency(table)      # correction=True applies at dof 1
            assert abs(det.statistic - ref.statistic) < 1e-12 and abs(det.p_value - ref.pvalue) < 1e-12
    det.update_many(["c"] * 60)                      # a category the reference never saw
    _, table = det.table()
    assert sorted(det.categories) == ["a", "b", "c"]
    assert math.isclose(det.statistic, stats.chi2_contingency(table).statistic, rel_tol=1e-12)
    assert det.rejecting
    b = roundtrip(det)
    more = rng.choice(["a", "b", "c"], size=500).tolist()
    assert batched(det, more) == batched(b, more)


def test_chi2_homogeneity_matches_scipy():
    rng = np.random.default_rng(18)
    for k in (2, 3, 5):
        a = {c: int(n) for c, n in zip("abcde"[:k], rng.integers(0, 40, k))}
        b = {c: int(n) for c, n in zip("abcde"[:k], rng.integers(1, 40, k))}
        keep = [c for c in a if a[c] + b[c]]
        ref = stats.chi2_contingency([[a[c] for c in keep], [b[c] for c in keep]])
        stat, p, dof = chi2_homogeneity(a, b)
        assert math.isclose(stat, ref.statistic, rel_tol=1e-12) and abs(p - ref.pvalue) < 1e-12 and dof == ref.dof
    assert chi2_homogeneity({"a": 3}, {"a": 5}) == (0.0, 1.0, 0)


# -- common shape ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [ADWIN, PageHinkley, lambda: KSWindow(100), lambda: PSI(100), lambda: ChiSquare(100)])
def test_common_interface(make):
    det = make()
    assert det.drift_detected is False
    xs = shifted_stream(17, 3000)
    if isinstance(det, ChiSquare):
        xs = ["a" if v < 0.5 else "b" for v in xs]
    det.update(xs[0])
    det.update_many(xs[1:])
    r = det.reading()
    assert isinstance(r, Reading) and r.drifted in (True, False)
    assert json.dumps(r.as_dict()) and json.dumps(det.to_state())
    assert all(isinstance(n, int) for n in r.window_sizes)


def with_non_finite(xs: np.ndarray, seed: int, rate: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xs = xs.copy()
    bad = rng.random(len(xs)) < rate
    xs[bad] = rng.choice([np.nan, np.inf, -np.inf], int(bad.sum()))
    return xs


dirty_streams = st.builds(with_non_finite, xs=streams, seed=st.integers(0, 2**31),
                          rate=st.sampled_from([0.0, 0.01, 0.3]))
category_streams = st.lists(st.sampled_from(["a", "b", "c", "d", None]), max_size=600)

DETECTORS = {
    "adwin": (lambda: ADWIN(delta=0.1, clock=3), dirty_streams),
    "page_hinkley": (lambda: PageHinkley(min_instances=5, threshold=5.0), dirty_streams),
    "ks": (lambda: KSWindow(40, reference_size=60, alpha=0.01), dirty_streams),
    "psi": (lambda: PSI(50, reference_size=80, threshold=0.1), dirty_streams),
    "chi2": (lambda: ChiSquare(25, reference_size=40, alpha=0.05), category_streams),
}


@pytest.mark.parametrize("name", DETECTORS)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_batch_equals_one_by_one_with_skipped_values(name, data):
    # NaN and inf (None for categories) mixed in, the stream cut into random batches: after
    # every batch, the detections, the flag, the reading and the checkpoint are those of
    # update called on each value.
    make, stream = DETECTORS[name]
    xs = data.draw(stream)
    cuts = data.draw(st.lists(st.integers(0, len(xs)), max_size=8))
    one, many = make(), make()
    bounds = sorted({0, len(xs), *cuts})
    for lo, hi in zip(bounds, bounds[1:]):
        assert (many.update_many(xs[lo:hi]) + lo).tolist() == detections(one, xs[lo:hi], lo)
        assert many.drift_detected == one.drift_detected
        assert many.reading() == one.reading()
        assert many.to_state() == one.to_state()


@pytest.mark.parametrize("name", ["adwin", "page_hinkley", "ks", "psi"])
def test_a_value_that_is_not_a_finite_number_is_skipped_and_clears_the_flag(name):
    make, _ = DETECTORS[name]
    det = make()
    for x in shifted_stream(19, 5000):
        det.update(x)
        if det.drift_detected:
            break
    assert det.drift_detected
    state = det.to_state()
    for x in (math.nan, math.inf, -math.inf, None, "1.0"):
        det.update(x)
        assert not det.drift_detected and det.to_state() == {**state, "drift": False}


@pytest.mark.parametrize("make,message", [
    (lambda: ADWIN(delta=1.0), "delta must be in (0, 1), got 1.0"),
    (lambda: ADWIN(clock=0), "clock must be >= 1, got 0"),
    (lambda: ADWIN(grace_period=-1), "grace_period must be >= 0, got -1"),
    (lambda: PageHinkley(mode="sideways"), "mode must be 'up', 'down' or 'both', got 'sideways'"),
    (lambda: KSWindow(alpha=0.0), "alpha must be in (0, 1), got 0.0"),
    (lambda: PSI(n_bins=1), "n_bins must be >= 2, got 1"),
    (lambda: ChiSquare(window_size=0), "window_size must be >= 1, got 0"),
])
def test_a_bad_parameter_is_named_with_its_allowed_range(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.parametrize("module", ["adwin", "page_hinkley", "ks", "psi", "chi2"])
def test_the_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"stream_processors.detectors.{module}"))
    assert result.attempted and not result.failed

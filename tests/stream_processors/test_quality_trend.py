"""Generation-quality windows and the Mann-Kendall trend test."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from stream_processors.quality import METRICS, QualityMonitor, window_metrics
from stream_processors.trend import TrendMonitor, mann_kendall


def completions(rng, n, vocab, length):
    return [rng.choice(vocab, size=length).tolist() for _ in range(n)]


def test_quality_metrics_by_hand():
    m = window_metrics([["a", "b", "a"], ["b", "b"]])
    assert m["distinct_1"] == 2 / 5
    assert m["distinct_2"] == 3 / 3                      # (a,b), (b,a), (b,b); none across completions
    assert math.isclose(m["token_entropy"], -(0.4 * math.log2(0.4) + 0.6 * math.log2(0.6)))
    assert m["mean_length"] == 2.5


def test_quality_windows_and_z_scores():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(200)]
    mon = QualityMonitor(window_size=50, baseline_windows=5)
    data = completions(rng, 500, vocab, 30) + completions(rng, 100, vocab[:5], 30)   # then: repetition
    results = [w for c in data if (w := mon.update(c)) is not None]
    assert len(results) == 12 and all(r.baseline for r in results[:5])
    for r, chunk in zip(results, (data[i:i + 50] for i in range(0, 600, 50))):
        expected = window_metrics(chunk)
        for m in METRICS:
            assert math.isclose(getattr(r, m), expected[m], rel_tol=1e-12)
    quiet, collapsed = results[5:10], results[10:]
    assert all(abs(z) < 6 for r in quiet for z in r.z.values())
    assert all(r.z["distinct_1"] < -10 and r.z["token_entropy"] < -10 for r in collapsed)
    back = QualityMonitor.from_state(json.loads(json.dumps(mon.to_state())))
    assert back.baseline == mon.baseline


def test_quality_length_only_and_text():
    mon = QualityMonitor(window_size=2, baseline_windows=1)
    assert mon.update(length=10) is None
    w = mon.update("the cat the")
    assert w.mean_length == 6.5 and w.distinct_1 == 2 / 3


def test_mann_kendall_against_references():
    rng = np.random.default_rng(1)
    x = rng.normal(size=60) + 0.03 * np.arange(60)
    r = mann_kendall(x)
    t = np.arange(60)
    s = sum(np.sign(x[j] - x[i]) for i in range(60) for j in range(i + 1, 60))
    assert r.s == s
    assert math.isclose(r.tau, stats.kendalltau(t, x).statistic, rel_tol=1e-12)       # no ties
    ts = stats.theilslopes(x, t)
    assert math.isclose(r.slope, ts.slope, rel_tol=1e-12) and math.isclose(r.intercept, ts.intercept, rel_tol=1e-9)
    z = (s - 1) / math.sqrt(60 * 59 * 125 / 18)
    assert math.isclose(r.p_value, 2 * stats.norm.sf(abs(z)), rel_tol=1e-9)
    assert r.trend == "increasing" and r.p_value < 0.05


def test_mann_kendall_variance_with_ties_is_exact():
    # Var(S) under H0 by enumerating every ordering of a series with ties.
    x = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 5.0])
    svals = [sum(np.sign(p[j] - p[i]) for i in range(7) for j in range(i + 1, 7))
             for p in itertools.permutations(x)]
    assert math.isclose(mann_kendall(x).var_s, float(np.var(svals)), rel_tol=1e-12)


@pytest.mark.parametrize("slope,severity", [(0.0, "none"), (0.01, "low"), (0.025, "medium"), (0.2, "high")])
def test_trend_severity(slope, severity):
    rng = np.random.default_rng(2)
    mon = TrendMonitor(window=60, alpha=0.05)
    noise = rng.normal(size=200)
    out = None
    for i in range(200):
        out = mon.update(noise[i] + slope * i)
    assert out.severity == severity or (severity == "low" and out.severity in ("none", "low"))
    back = TrendMonitor.from_state(json.loads(json.dumps(mon.to_state())))
    assert back.update(1.0) == mon.update(1.0)


@pytest.mark.parametrize("with_text", [False, True])
def test_quality_batch_equals_one_by_one(with_text):
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 40, 1000).tolist()
    texts = [" ".join(rng.choice(["a", "b", "c", "d"], size=k)) if with_text and rng.random() < 0.7 else None
             for k in lengths]
    one, many = QualityMonitor(window_size=30, baseline_windows=3), QualityMonitor(window_size=30, baseline_windows=3)
    expected = [w for t, k in zip(texts, lengths) if (w := one.update(t, k)) is not None]
    got = []
    for lo in range(0, 1000, 77):
        got += many.update_many(lengths[lo:lo + 77], texts[lo:lo + 77] if with_text else None)
    assert [w.as_dict() for w in got] == [w.as_dict() for w in expected] and len(got) == 33
    assert json.dumps(many.to_state()) == json.dumps(one.to_state())


def test_trend_median_is_numpys():
    from stream_processors.trend import _median

    rng = np.random.default_rng(4)
    for n in range(1, 40):
        v = rng.normal(size=n) * 10.0 ** rng.integers(-9, 9)
        assert _median(v) == float(np.median(v))

"""The quantile sketch: same answers as DataDog's ddsketch, mergeability and the
relative-error guarantee (hypothesis), bounded memory, checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
from ddsketch import LogCollapsingLowestDenseDDSketch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_processors.sketch import QuantileSketch

QS = np.linspace(0.0, 1.0, 101)
values = st.lists(st.one_of(st.floats(1e-6, 1e6), st.floats(-1e6, -1e-6), st.just(0.0)), min_size=1, max_size=400)


def test_matches_ddsketch():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.lognormal(0.0, 2.0, 20_000), -rng.lognormal(0.0, 1.0, 800), np.zeros(30)])
    rng.shuffle(x)
    ref = LogCollapsingLowestDenseDDSketch(0.01, 2048)
    for v in x:
        ref.add(float(v))
    ours = QuantileSketch(0.01, 2048)
    ours.add_many(x)
    for q in QS:
        assert ours.quantile(q) == ref.get_quantile_value(q)
    assert ours.count == ref.count and math.isclose(ours.sum, ref.sum, rel_tol=1e-9)


@settings(max_examples=80, deadline=None)
@given(a=values, b=values, alpha=st.sampled_from([0.005, 0.01, 0.05]))
def test_merge_equals_sketch_of_union(a, b, alpha):
    whole = QuantileSketch(alpha)
    whole.add_many(a + b)
    left, right = QuantileSketch(alpha), QuantileSketch(alpha)
    left.add_many(a)
    for v in b:
        right.add(v)
    left.merge(right)
    assert left.count == whole.count and left.zero_count == whole.zero_count
    assert left.min == whole.min and left.max == whole.max
    for q in QS:
        assert left.quantile(q) == whole.quantile(q)


@settings(max_examples=80, deadline=None)
@given(x=values, alpha=st.sampled_from([0.005, 0.01, 0.05]))
def test_relative_error_guarantee(x, alpha):
    s = QuantileSketch(alpha, bin_limit=1 << 20)     # no collapsing: the guarantee holds everywhere
    s.add_many(x)
    xs = np.sort(np.asarray(x))
    for q in QS:
        true = xs[int(math.floor(q * (len(xs) - 1)))]
        assert abs(s.quantile(q) - true) <= alpha * abs(true) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(x=values)
def test_one_by_one_equals_batch_and_checkpoint(x):
    a, b = QuantileSketch(), QuantileSketch()
    for v in x:
        a.add(v)
    b.add_many(x)
    c = QuantileSketch.from_state(json.loads(json.dumps(b.to_state())))
    for q in QS:
        assert a.quantile(q) == b.quantile(q) == c.quantile(q)
    assert c.summary() == b.summary()


def test_bin_limit_bounds_memory_and_keeps_high_quantiles():
    rng = np.random.default_rng(1)
    x = np.exp(rng.uniform(-40.0, 10.0, 50_000))       # spans far more bins than the limit
    s = QuantileSketch(0.01, bin_limit=512)
    for chunk in np.array_split(x, 10):
        s.add_many(chunk)
    assert len(s._pos.bins) <= 512
    xs = np.sort(x)
    for q in (0.95, 0.99, 0.999):
        true = xs[int(q * (len(xs) - 1))]
        assert abs(s.quantile(q) - true) <= 0.01 * true * (1 + 1e-9)


def test_latency_summary():
    s = QuantileSketch()
    assert math.isnan(s.quantile(0.5))
    s.add_many(np.arange(1, 1001, dtype=float))
    summ = s.summary()
    assert summ["count"] == 1000 and summ["min"] == 1.0 and summ["max"] == 1000.0
    for key, true in (("p50", 500.0), ("p95", 950.0), ("p99", 990.0)):
        assert abs(summ[key] - true) <= 0.01 * true

"""Candidate versions against the stable version (stream_processors/compare.py), through the
processor: same distribution, no drift; a shifted candidate, drifted signals naming it and
the stable version; checkpoints; versions in different partitions; and what the rollout
controller makes of the signals."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos import events_pb2
from stream_processors.compare import Rows, VersionComparison
from eventbus.signals import SignalKind
from stream_processors.processor import PartitionState
from stream_processors.settings import Settings
from stream_processors.runner import signal_message

STABLE, CANARY, SHADOW, PINNED = 1, 2, 3, 4
COMPARED = ("ks_vs_stable", "chi2_vs_stable")


def event(i: int, version: str, route: int, rng: random.Random, shift: float = 0.0):
    e = events_pb2.InferenceEvent(
        event_id=f"e{i}", request_id=f"r{i}", model="m", version=version, route=route, method="Generate",
        status=1, prompt_tokens=rng.randint(10, 50), completion_tokens=rng.randint(5, 30),
        finish_reason=rng.choice(["stop", "length"]), total_seconds=rng.lognormvariate(-1, 0.3),
        first_token_seconds=rng.uniform(0.01, 0.1))
    e.confidence.mean_logprob = rng.gauss(-1.0 + shift, 0.2)
    e.confidence.mean_entropy = rng.gauss(2.0, 0.3)
    e.confidence.min_top1_prob = rng.random()
    e.time.FromNanoseconds(int((1.7e9 + i * 0.01) * 1e9))
    return e


def canary_stream(n: int, share: float = 0.1, shift: float = 0.0, seed: int = 0, candidate_route: int = CANARY):
    """v1 stable, v2 taking `share` of the requests (a few pinned requests of both on the side)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 0.02:
            out.append(event(i, rng.choice(["v1", "v2"]), PINNED, rng, shift=5.0))   # never compared
        elif rng.random() < share:
            out.append(event(i, "v2", candidate_route, rng, shift))
        else:
            out.append(event(i, "v1", STABLE, rng))
    return out


def run(events, state: PartitionState, batch: int = 700) -> list:
    out = []
    for k in range(0, len(events), batch):
        state.apply_events(events[k:k + batch], out)
    return out


def comparisons(out) -> list:
    return [o for o in out if o.detector in COMPARED]


def test_same_distribution_gives_signals_and_no_drift():
    out = comparisons(run(canary_stream(20_000), PartitionState(0, Settings())))
    assert len(out) >= 7 * 10
    assert {(o.model, o.version, o.labels["reference_version"]) for o in out} == {("m", "v2", "v1")}
    assert {o.feature for o in out} == {"completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob",
                                        "total_seconds", "first_token_seconds", "finish_reason"}
    assert not [o for o in out if o.drifted]
    assert all(o.p_value is not None and o.threshold == Settings().compare_alpha for o in out)
    ks = [o for o in out if o.detector == "ks_vs_stable"]
    assert all(o.reference_size == o.window_size >= Settings().compare_min for o in ks)
    assert {o.kind for o in ks if o.feature in ("total_seconds", "first_token_seconds")} == {SignalKind.LATENCY}
    assert {o.kind for o in ks if o.feature == "mean_logprob"} == {SignalKind.DRIFT}


@pytest.mark.parametrize("route", [CANARY, SHADOW])
def test_shifted_candidate_drifts_against_stable(route):
    out = comparisons(run(canary_stream(20_000, shift=0.5, candidate_route=route), PartitionState(0, Settings())))
    drifted = {(o.detector, o.feature) for o in out if o.drifted}
    assert drifted == {("ks_vs_stable", "mean_logprob")}
    last = [o for o in out if o.feature == "mean_logprob"][-1]
    assert (last.version, last.labels["reference_version"], last.drifted) == ("v2", "v1", True)
    assert last.p_value < 1e-10 and last.statistic > 0.5


def test_low_traffic_candidate_is_compared_over_the_same_period():
    # 2 % on the canary: its partners are the stable events served after each of its own,
    # so they span the same time, not the last few seconds of stable traffic
    events = canary_stream(60_000, share=0.02)
    state = PartitionState(0, Settings())
    assert comparisons(run(events, state))
    c = state.comparisons["m"].candidates["v2"]
    assert len(c.partners) == len(c.events) == Settings().compare_window
    assert abs(c.partners.times[0] - c.events.times[0]) < 1.0
    assert np.all(np.diff(c.partners.times) > 0)


def test_promotion_makes_the_candidate_the_reference():
    rng = random.Random(3)
    before = canary_stream(10_000, shift=0.5)
    # v2 is promoted: its events are now the stable ones, and v3 comes as a canary
    after = []
    for i in range(10_000):
        canary = rng.random() < 0.1
        after.append(event(10_000 + i, "v3" if canary else "v2", CANARY if canary else STABLE, rng))
    state = PartitionState(0, Settings())
    out = comparisons(run(before + after, state))
    late = [o for o in out if o.version == "v3"]
    assert late and {o.labels["reference_version"] for o in late} == {"v2"}
    assert "v2" not in state.comparisons["m"].candidates


def test_checkpoint_in_the_middle_changes_nothing():
    events = canary_stream(12_000, shift=0.3, seed=4)
    whole = comparisons(run(events, PartitionState(0, Settings())))
    s = Settings()
    first = PartitionState(0, s)
    out = run(events[:5600], first)
    resumed = PartitionState.decode(first.encode(), s)
    out += run(events[5600:], resumed)
    assert comparisons(out) == whole


def test_versions_in_different_partitions_are_not_compared():
    # keyed model/version, v1 and v2 may land in different partition numbers: each state
    # sees one version only, and nothing is compared (never against the wrong reference)
    events = canary_stream(20_000, shift=0.5)
    one, two = PartitionState(0, Settings()), PartitionState(1, Settings())
    out = run([e for e in events if e.version == "v1"], one) + run([e for e in events if e.version == "v2"], two)
    assert not comparisons(out)


def test_the_controller_counts_a_drifted_comparison_as_the_candidates_drift():
    from rollout import analysis, wire

    out = comparisons(run(canary_stream(20_000, shift=0.5), PartitionState(0, Settings())))
    candidate, stable = analysis.Window(0.0), analysis.Window(0.0)
    for o in out:
        sig = wire.signal(events_pb2.Signal.FromString(signal_message(o, "test").SerializeToString()))
        assert (sig.version, sig.kind) == ("v2", "latency" if o.feature.endswith("_seconds") else "drift")
        if sig.kind == "drift":   # what the controller's observe() keeps
            candidate.add_drift(sig.detector, sig.feature, sig.drifted, sig.statistic)
    check = analysis.drift(candidate, stable, analysis.Thresholds())
    assert check.verdict == analysis.FAIL and "ks_vs_stable/mean_logprob" in check.text


# -- what the rollout controller decides on: error rates, time per token, confidence, feedback ----

def canary(n, seed=0, *, error=(0.01, 0.01), token_seconds=(0.02, 0.02), logprob=(-1.0, -1.0), share=0.3):
    """v1 stable and v2 canary: error rates, seconds per token after the first and mean log-probs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = rng.random() < share
        e = event(i, "v2" if c else "v1", CANARY if c else STABLE, rng)
        if rng.random() < error[c]:
            e.status = events_pb2.STATUS_INTERNAL
        e.completion_tokens, e.first_token_seconds = 11, 0.05
        e.total_seconds = 0.05 + 10 * rng.lognormvariate(math.log(token_seconds[c]), 0.2)
        e.confidence.mean_logprob = rng.gauss(logprob[c], 0.3)
        out.append(e)
    return out


def latest(out, detector, feature):
    found = [o for o in out if o.detector == detector and o.feature == feature]
    assert found, (detector, feature)
    return found[-1]


def test_the_comparisons_the_controller_decides_on():
    out = run(canary(6000, error=(0.01, 0.15), token_seconds=(0.02, 0.03), logprob=(-1.0, -1.4)),
              PartitionState(0, Settings()))
    e = latest(out, "error_rate_vs_stable", "error")
    assert e.labels == {"reference_version": "v1"} and e.version == "v2" and e.kind == SignalKind.QUALITY
    assert e.drifted and e.p_value < 1e-6 and e.value == pytest.approx(0.15, abs=0.05)
    assert e.statistic == pytest.approx(0.14, abs=0.05) and e.window_size == e.reference_size == 500
    assert e.events >= 1700   # the candidate's events compared so far
    mw, med = latest(out, "mann_whitney_vs_stable", "token_seconds"), latest(out, "median_vs_stable", "token_seconds")
    assert mw.kind == med.kind == SignalKind.LATENCY and mw.statistic > 0.5 and mw.p_value < 1e-10
    assert med.value == pytest.approx(0.03, rel=0.1) and med.value - med.statistic == pytest.approx(0.02, rel=0.1)
    assert med.p_value is None and med.threshold is None and not med.drifted   # a measurement, not a test
    conf = latest(out, "mann_whitney_vs_stable", "mean_logprob")
    assert conf.kind == SignalKind.DRIFT and conf.statistic < -0.4 and conf.drifted

    same = run(canary(6000), PartitionState(0, Settings()))
    assert not [o for o in same if o.drifted and "vs_stable" in o.detector]


def test_error_rate_and_mann_whitney_figures_against_scipy():
    from scipy import stats

    from stream_processors.compare import mann_whitney, worse_by

    z, p = worse_by(40, 400, 8, 400, 0.01)
    a1, a2 = 41 / 402, 9 / 402  # Agresti-Caffo: one error and one success added to each side
    want = (a1 - a2 - 0.01) / math.sqrt(a1 * (1 - a1) / 402 + a2 * (1 - a2) / 402)
    assert z == pytest.approx(want) and p == pytest.approx(stats.norm.sf(want))
    rng = np.random.default_rng(1)
    c, s = rng.normal(0.3, 1, 80), rng.normal(0, 1, 90)
    r, p = mann_whitney(c, s)
    res = stats.mannwhitneyu(c, s, alternative="two-sided")
    assert p == pytest.approx(res.pvalue) and r == pytest.approx(2 * res.statistic / (80 * 90) - 1)
    assert mann_whitney(np.ones(30), np.ones(30)) == (0.0, 1.0)


def test_feedback_of_a_candidate_is_compared_with_stables():
    rng = random.Random(5)
    events, feedback = [], []
    for i in range(4000):
        c = rng.random() < 0.3
        e = event(i, "v2" if c else "v1", CANARY if c else STABLE, rng)
        e.method = "Classify"
        e.label_probabilities.update({"yes": 0.9, "no": 0.1})
        events.append(e)
        right = rng.random() < (0.5 if c else 0.9)
        f = events_pb2.FeedbackEvent(event_id=f"f{i}", request_id=e.request_id, model="m", version=e.version,
                                     label="yes" if right else "no")
        f.time.CopyFrom(e.time)
        feedback.append(f)
    state, out = PartitionState(0, Settings()), []
    for k in range(0, 4000, 500):
        state.apply_events(events[k:k + 500], out)
        state.apply_feedback(feedback[k:k + 500], out)
    acc, ece = latest(out, "accuracy_vs_stable", "label"), latest(out, "ece_vs_stable", "label")
    assert acc.labels == ece.labels == {"reference_version": "v1"} and acc.kind == SignalKind.QUALITY
    assert ece.kind == SignalKind.CALIBRATION and acc.window_size == ece.window_size == 500
    assert acc.value == pytest.approx(0.5, abs=0.06) and acc.statistic == pytest.approx(-0.4, abs=0.07)
    assert acc.drifted and acc.p_value < 1e-10
    assert ece.value == pytest.approx(0.4, abs=0.06) and ece.value - ece.statistic == pytest.approx(0.0, abs=0.05)
    assert not [o for o in out if o.detector.endswith("_vs_stable") and o.feature == "label" and o.version == "v1"]


# -- the pairing of candidate events with stable ones -------------------------------------------

def partners_by_hand(sequence) -> list[int]:
    """Each candidate event ('c') earns the next stable event ('s') not earned before."""
    waiting, taken = 0, []
    for i, kind in enumerate(sequence):
        if kind == "c":
            waiting += 1
        elif kind == "s" and waiting:
            waiting -= 1
            taken.append(i)
    return taken


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(st.sampled_from("cssp"), min_size=1, max_size=300),
       cuts=st.lists(st.integers(0, 300), max_size=5))
def test_partners_do_not_depend_on_batches(sequence, cuts):
    # c: a canary event of v2, s: a stable event of v1, p: a pinned one of v1 (no partner)
    cmp = VersionComparison(("x",), window=1000, every=10 ** 9, min_size=1)
    bounds = sorted({0, len(sequence), *[c for c in cuts if c < len(sequence)]})
    values = np.arange(len(sequence), dtype=np.float64)[:, None]
    for lo, hi in zip(bounds, bounds[1:]):
        part = sequence[lo:hi]
        rows = {v: np.array([i for i, k in enumerate(part) if k in kinds], dtype=np.int64)
                for v, kinds in (("v1", "sp"), ("v2", "c"))}
        rows = {v: at for v, at in rows.items() if len(at)}
        routes = np.array([{"s": STABLE, "c": CANARY, "p": PINNED}[k] for k in part])
        cmp.add(rows, routes, values[lo:hi], ["stop"] * len(part), values[lo:hi, 0])
    expected = partners_by_hand(sequence)
    if "c" in sequence and "s" in sequence:
        assert cmp.candidates["v2"].partners.times.tolist() == expected
    else:
        assert not expected


def test_rows_keep_the_latest():
    r = Rows(3, 2)
    r.extend(np.arange(8.0).reshape(4, 2), list("abcd"), np.arange(4.0))
    r.extend(np.arange(2.0).reshape(1, 2), ["e"], np.array([9.0]))
    back = Rows.from_state(r.to_state(), 3, 2)
    assert back.finish == ["c", "d", "e"] and back.times.tolist() == [2.0, 3.0, 9.0]
    assert back.values.tolist() == [[4.0, 5.0], [6.0, 7.0], [0.0, 1.0]]

"""Each candidate version of a model against the model's stable version, over the same period.

Events served on route stable are the stable version's; events on route canary or shadow
are a candidate version's (pinned requests chose their version and say nothing about a
share of the traffic). The stable version is the version of the latest stable event.

Each candidate event earns the next stable event served after it (the first one not
earned by an earlier candidate event), so a candidate's sample and its stable partners
cover the same stretch of time however the traffic is split: with 5 % of it on a canary,
the stable sample is the stable event served after each canary event, not the last few
seconds of stable traffic. When the stable version changes, the partners start again
(candidate events still waiting take the new stable version's next ones).

Every ``every`` events of a candidate, its last ``window`` events and their partners are
compared (``compare``), on the most recent values the two sides have as many of (at least
``min_size``):

- per compared feature (``COMPARED``), a two-sample Kolmogorov-Smirnov test;
- per tested feature (``TESTED``: those and the time per output token), a Mann-Whitney U
  test (two-sided p; statistic the rank-biserial correlation, positive where the
  candidate's values run higher) and the two medians;
- the error rates: a one-sided two-proportion z-test that the candidate's is worse by more
  than ``error_margin`` (the margin is in the null hypothesis, so a small sample does not
  fail on a point estimate alone), with the Agresti-Caffo adjustment (one success and one
  failure added to each side), which keeps it honest at small counts;
- the finish reasons: a chi-square test.

Joined feedback (the top label's probability and whether it was right) is kept per
version, the latest ``window`` of each; every ``every`` joins of a candidate
(``compare_feedback``) its accuracy is tested against stable's the same way (worse by
more than ``accuracy_margin``) and the two expected calibration errors are given.

These are the figures the rollout controller decides a canary step on. Both sides of a
comparison must be in one place: see ``PartitionState`` for what that asks of the record
keys.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import stats

from eventbus.signals import COMPARED, TESTED, Detector, Feature
from protos import events_pb2
from stream_processors.calibration import ece_of
from stream_processors.detectors import chi2_homogeneity, ks_2samp

__all__ = ["Result", "Rows", "VersionComparison", "ROUTE_STABLE", "CANDIDATE_ROUTES", "worse_by", "mann_whitney"]

ROUTE_STABLE = events_pb2.ROUTE_STABLE
CANDIDATE_ROUTES = (events_pb2.ROUTE_CANARY, events_pb2.ROUTE_SHADOW)


@dataclass(frozen=True)
class Result:
    """One test or measurement of a candidate against the stable version."""
    candidate: str
    reference: str
    detector: str               # one of the *_vs_stable detectors
    feature: str
    statistic: float
    p_value: float | None
    n_reference: int
    n_candidate: int
    time: float                 # event time of the candidate's latest event (or joined feedback)
    value: float | None = None  # median, error rate, accuracy, ECE: the candidate's own
    events: int = 0             # the candidate's events (joined feedbacks) compared so far


def worse_by(bad: int, n1: int, base_bad: int, n2: int, margin: float) -> tuple[float, float]:
    """One-sided two-proportion z-test that the first rate exceeds the second by more than
    ``margin``, Agresti-Caffo adjusted. Returns (z, p)."""
    a, b = (bad + 1) / (n1 + 2), (base_bad + 1) / (n2 + 2)
    se = math.sqrt(a * (1 - a) / (n1 + 2) + b * (1 - b) / (n2 + 2))
    z = (a - b - margin) / se
    return z, float(stats.norm.sf(z))


def mann_whitney(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(rank-biserial correlation, two-sided p) of the Mann-Whitney U test; the correlation
    is positive where the candidate's values run higher. Identical samples give (0, 1)."""
    res = stats.mannwhitneyu(candidate, reference, alternative="two-sided")
    r = 2 * float(res.statistic) / (len(candidate) * len(reference)) - 1
    p = float(res.pvalue)
    return r, p if math.isfinite(p) else 1.0


class Rows:
    """The last ``size`` events of one side: feature values, finish reasons, event times."""

    def __init__(self, size: int, width: int):
        self.size = size
        self.values = np.zeros((0, width))
        self.finish: list[str] = []
        self.times = np.zeros(0)

    def extend(self, values: np.ndarray, finish: list, times: np.ndarray) -> None:
        self.values = np.concatenate((self.values, values))[-self.size:]
        self.finish = (self.finish + finish)[-self.size:]
        self.times = np.concatenate((self.times, times))[-self.size:]

    def __len__(self) -> int:
        return len(self.times)

    def to_state(self) -> dict:
        return {"values": self.values.tolist(), "finish": self.finish, "times": self.times.tolist()}

    @classmethod
    def from_state(cls, st: dict, size: int, width: int) -> "Rows":
        r = cls(size, width)
        r.extend(np.asarray(st["values"], dtype=np.float64).reshape(-1, width), list(st["finish"]),
                 np.asarray(st["times"], dtype=np.float64))
        return r


class _Candidate:
    def __init__(self, size: int, width: int):
        self.events = Rows(size, width)
        self.partners = Rows(size, width)
        self.credit = 0         # candidate events still waiting for a stable partner
        self.n = 0              # candidate events seen


class _Feedback:
    """A version's latest joined feedback: top-label probability, right or not, event time."""

    def __init__(self, size: int):
        self.size = size
        self.pairs = np.zeros((0, 3))
        self.n = 0              # joins seen

    def extend(self, pairs: np.ndarray) -> None:
        self.pairs = np.concatenate((self.pairs, pairs))[-self.size:]
        self.n += len(pairs)


class VersionComparison:
    """The candidates of one model against its stable version.

    ``features``: the names of the columns of the values given to ``add``; a column is
    tested as its name says (KS for ``COMPARED``, Mann-Whitney and medians for ``TESTED``,
    the error rates for ``error``), any other is carried along untested.
    """

    def __init__(self, features: tuple[str, ...], window: int = 500, every: int = 100, min_size: int = 50,
                 error_margin: float = 0.01, accuracy_margin: float = 0.05, bins: int = 10):
        self.features = tuple(features)
        self.window, self.every, self.min_size = int(window), int(every), int(min_size)
        self.error_margin, self.accuracy_margin, self.bins = float(error_margin), float(accuracy_margin), int(bins)
        self.stable: str | None = None
        self.candidates: dict[str, _Candidate] = {}
        self.feedback: dict[str, _Feedback] = {}

    def add(self, rows: dict, routes: np.ndarray, values: np.ndarray, finish: list, times: np.ndarray) -> list[str]:
        """Events of the model: ``rows`` maps each version to the positions of its events in
        the arrays that follow (positions in the order served); per position the route, the
        feature values (a row), the finish reason and the event time. Returns the
        candidates due for a comparison."""
        last_stable = {v: int(at[routes[at] == ROUTE_STABLE].max(initial=-1)) for v, at in rows.items()}
        latest = max(last_stable, key=last_stable.get)
        if last_stable[latest] >= 0 and latest != self.stable:
            self.stable = latest
            self.candidates.pop(latest, None)
            for c in self.candidates.values():   # partners of another version; those waiting wait on
                c.partners = Rows(self.window, len(self.features))
        none = np.zeros(0, dtype=np.int64)
        stable = rows.get(self.stable, none)
        stable = stable[routes[stable] == ROUTE_STABLE]
        due = []
        for version in dict.fromkeys([*self.candidates, *rows]):   # those waiting, those with events
            at = rows.get(version, none)
            own = at[np.isin(routes[at], CANDIDATE_ROUTES)]
            c = self.candidates.get(version)
            if version == self.stable or not len(own) and (c is None or not c.credit or not len(stable)):
                continue
            if c is None:
                c = self.candidates[version] = _Candidate(self.window, len(self.features))
            both = np.concatenate((own, stable))
            order = np.argsort(both, kind="stable")
            step = np.where(order < len(own), 1, -1)        # +1 a candidate event, -1 a stable one
            # credit after each event: +1 per candidate event, -1 per stable event taken, never
            # below 0 (a stable event no candidate event waits for is not taken)
            balance = c.credit + np.cumsum(step)
            credit = balance - np.minimum(0, np.minimum.accumulate(balance))
            taken = both[order][(step < 0) & (np.concatenate(([c.credit], credit[:-1])) > 0)]
            c.credit = min(int(credit[-1]), self.window)
            c.events.extend(values[own], [finish[i] for i in own], times[own])
            c.partners.extend(values[taken], [finish[i] for i in taken], times[taken])
            before, c.n = c.n, c.n + len(own)
            if c.n // self.every > before // self.every:
                due.append(version)
        return due

    def compare(self, version: str) -> list[Result]:
        c = self.candidates[version]
        out = []
        if len(c.partners) < self.min_size:
            return out
        when = float(c.events.times.max())

        def result(detector, feature, statistic, p, n_ref, n_cand, value=None):
            out.append(Result(version, self.stable, detector, feature, float(statistic), p, int(n_ref), int(n_cand),
                              when, value, c.n))

        for j, feature in enumerate(self.features):
            ref, cand = c.partners.values[:, j], c.events.values[:, j]
            if feature == Feature.ERROR:
                n = min(len(ref), len(cand))
                if n < self.min_size:
                    continue
                bad, base_bad = int(cand[-n:].sum()), int(ref[-n:].sum())
                _, p = worse_by(bad, n, base_bad, n, self.error_margin)
                result(Detector.ERROR_RATE_VS_STABLE, feature, (bad - base_bad) / n, p, n, n, bad / n)
                continue
            ref, cand = ref[np.isfinite(ref)], cand[np.isfinite(cand)]
            n = min(len(ref), len(cand))
            if n < self.min_size:
                continue
            ref, cand = ref[-n:], cand[-n:]
            if feature in COMPARED:
                d, p = ks_2samp(ref, cand)
                result(Detector.KS_VS_STABLE, feature, d, p, n, n)
            if feature in TESTED:
                r, p = mann_whitney(cand, ref)
                result(Detector.MANN_WHITNEY_VS_STABLE, feature, r, p, n, n)
                mc, ms = float(np.median(cand)), float(np.median(ref))
                result(Detector.MEDIAN_VS_STABLE, feature, mc - ms, None, n, n, mc)
        ref, cand = Counter(f for f in c.partners.finish if f), Counter(f for f in c.events.finish if f)
        n_ref, n_cand = sum(ref.values()), sum(cand.values())
        if min(n_ref, n_cand) >= self.min_size:
            stat, p, _ = chi2_homogeneity(ref, cand)
            result(Detector.CHI2_VS_STABLE, Feature.FINISH_REASON, stat, p, n_ref, n_cand)
        return out

    # -- joined feedback ------------------------------------------------------------------
    def add_feedback(self, version: str, confidence: np.ndarray, correct: np.ndarray, times: np.ndarray) -> bool:
        """Joined feedback of a version, in order. Returns whether the version, a candidate,
        is due for a comparison of its feedback with stable's."""
        f = self.feedback.get(version)
        if f is None:
            f = self.feedback[version] = _Feedback(self.window)
        before = f.n
        f.extend(np.column_stack((confidence, correct, times)))
        return version != self.stable and self.stable is not None and f.n // self.every > before // self.every

    def compare_feedback(self, version: str) -> list[Result]:
        cand, ref = self.feedback[version], self.feedback.get(self.stable)
        if ref is None or min(len(cand.pairs), len(ref.pairs)) < self.min_size:
            return []
        c, r = cand.pairs, ref.pairs
        when = float(c[:, 2].max())
        wrong, base_wrong = int(len(c) - c[:, 1].sum()), int(len(r) - r[:, 1].sum())
        _, p = worse_by(wrong, len(c), base_wrong, len(r), self.accuracy_margin)
        acc, base_acc = 1 - wrong / len(c), 1 - base_wrong / len(r)
        ece, base_ece = ece_of(c[:, 0], c[:, 1], self.bins), ece_of(r[:, 0], r[:, 1], self.bins)
        return [Result(version, self.stable, Detector.ACCURACY_VS_STABLE, Feature.LABEL, acc - base_acc, p, len(r),
                       len(c), when, acc, cand.n),
                Result(version, self.stable, Detector.ECE_VS_STABLE, Feature.LABEL, ece - base_ece, None, len(r),
                       len(c), when, ece, cand.n)]

    # -- checkpoints ----------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"stable": self.stable,
                "candidates": {v: {"credit": c.credit, "n": c.n, "events": c.events.to_state(),
                                   "partners": c.partners.to_state()} for v, c in self.candidates.items()},
                "feedback": {v: {"n": f.n, "pairs": f.pairs.tolist()} for v, f in self.feedback.items()}}

    @classmethod
    def from_state(cls, st: dict, features: tuple[str, ...], window: int, every: int, min_size: int,
                   **margins) -> "VersionComparison":
        m = cls(features, window, every, min_size, **margins)
        m.stable = st["stable"]
        width = len(m.features)
        for v, cs in st["candidates"].items():
            c = m.candidates[v] = _Candidate(window, width)
            c.credit, c.n = int(cs["credit"]), int(cs["n"])
            c.events = Rows.from_state(cs["events"], window, width)
            c.partners = Rows.from_state(cs["partners"], window, width)
        for v, fs in st.get("feedback", {}).items():
            f = m.feedback[v] = _Feedback(window)
            f.extend(np.asarray(fs["pairs"], dtype=np.float64).reshape(-1, 3))
            f.n = int(fs["n"])
        return m

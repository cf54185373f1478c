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
compared: per feature, a two-sample Kolmogorov-Smirnov test on the most recent values the
two sides have as many of (at least ``min_size``), and a chi-square test on the finish
reasons. Both sides of a comparison must be in one place: see ``PartitionState`` for what
that asks of the record keys.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from eventbus.signals import Detector, Feature
from protos import events_pb2
from stream_processors.detectors import chi2_homogeneity, ks_2samp

__all__ = ["Result", "Rows", "VersionComparison", "ROUTE_STABLE", "CANDIDATE_ROUTES"]

ROUTE_STABLE = events_pb2.ROUTE_STABLE
CANDIDATE_ROUTES = (events_pb2.ROUTE_CANARY, events_pb2.ROUTE_SHADOW)


@dataclass(frozen=True)
class Result:
    """One test of a candidate against the stable version."""
    candidate: str
    reference: str
    detector: str               # ks_vs_stable, chi2_vs_stable
    feature: str
    statistic: float
    p_value: float
    n_reference: int
    n_candidate: int
    time: float                 # event time of the candidate's latest event


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


class VersionComparison:
    """The candidates of one model against its stable version.

    ``features``: the names of the columns of the values given to ``add``.
    """

    def __init__(self, features: tuple[str, ...], window: int = 500, every: int = 100, min_size: int = 50):
        self.features = tuple(features)
        self.window, self.every, self.min_size = int(window), int(every), int(min_size)
        self.stable: str | None = None
        self.candidates: dict[str, _Candidate] = {}

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
        for j, feature in enumerate(self.features):
            ref, cand = c.partners.values[:, j], c.events.values[:, j]
            ref, cand = ref[np.isfinite(ref)], cand[np.isfinite(cand)]
            n = min(len(ref), len(cand))
            if n >= self.min_size:
                d, p = ks_2samp(ref[-n:], cand[-n:])
                out.append(Result(version, self.stable, Detector.KS_VS_STABLE, feature, d, p, n, n, when))
        ref, cand = Counter(f for f in c.partners.finish if f), Counter(f for f in c.events.finish if f)
        n_ref, n_cand = sum(ref.values()), sum(cand.values())
        if min(n_ref, n_cand) >= self.min_size:
            stat, p, _ = chi2_homogeneity(ref, cand)
            out.append(Result(version, self.stable, Detector.CHI2_VS_STABLE, Feature.FINISH_REASON, stat, p, n_ref, n_cand, when))
        return out

    # -- checkpoints ----------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"stable": self.stable,
                "candidates": {v: {"credit": c.credit, "n": c.n, "events": c.events.to_state(),
                                   "partners": c.partners.to_state()} for v, c in self.candidates.items()}}

    @classmethod
    def from_state(cls, st: dict, features: tuple[str, ...], window: int, every: int,
                   min_size: int) -> "VersionComparison":
        m = cls(features, window, every, min_size)
        m.stable = st["stable"]
        width = len(m.features)
        for v, cs in st["candidates"].items():
            c = m.candidates[v] = _Candidate(window, width)
            c.credit, c.n = int(cs["credit"]), int(cs["n"])
            c.events = Rows.from_state(cs["events"], window, width)
            c.partners = Rows.from_state(cs["partners"], window, width)
        return m

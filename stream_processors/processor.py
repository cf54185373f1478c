"""The processor's computation: events in, per model version state, signals out.

No Kafka here (the runner in ``runner.py`` feeds it): ``PartitionState.apply_events`` and
``apply_feedback`` take the decoded records of one fetch of one partition number, in order
(an event and its feedback share a key, so they land in the same partition number of
``vigil.inference.events`` and ``vigil.feedback``), and add the signals to publish to a
list. The whole state of a partition number (per model version: detectors, sketches,
calibration, quality, trends; per model: the comparison of its versions; the pending
feedback joins; the next offset of each topic) round-trips through ``to_state`` /
``from_state`` so a checkpoint carries state and offsets together.

What is published is the signal contract of ``eventbus/signals.py``: only its series, with
series labels only; what changes per reading goes in the ``Out`` fields. A detector that
has seen no value of its feature publishes nothing.

Work is done in batches: the events of one fetch are read a field at a time for the whole
fetch (``read_events``), grouped by model version, and every detector gets
``update_many`` over the batch's column, which is what makes the processor fast;
``update_many`` gives the same results as ``update`` value by value. Readings (every
detector's current statistic) are published every ``signal_every`` events of a model
version, at the batch boundary that crosses the multiple, and a drifted signal whenever a
detector detects inside a batch (its statistic is read at the end of that batch); the
comparisons of a candidate version with the stable one (``compare.py``: distributions,
error rates, time per output token, confidence) every ``compare_every`` candidate events,
at a batch boundary too, and of its joined feedback (accuracy, ECE) every
``compare_every`` joins. Joined feedback goes in batches cut where a calibration signal is
due (every ``calibration_every`` joins), so those signals and the concept-drift ones come
exactly where one-by-one updates would put them.

This is the one place where events are joined with their feedback and a candidate is
measured against stable: the rollout controller decides on these signals alone.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from eventbus.signals import COMPARED, CONTINUOUS, LATENCY, TESTED, Detector as D, Feature as F, kind_of
from protos import events_pb2
from stream_processors.calibration import Calibration
from stream_processors.compare import VersionComparison
from stream_processors.detectors import ADWIN, PSI, ChiSquare, KSWindow, PageHinkley
from stream_processors.quality import QualityMonitor
from stream_processors.recalibration import fit_temperature
from stream_processors.settings import Settings
from stream_processors.sketch import QuantileSketch
from stream_processors.trend import TrendMonitor

log = logging.getLogger(__name__)
NAN = float("nan")
FORMAT = 5   # of a checkpoint's state: another format keeps its offsets and joins, not its detectors

# The feature matrix has a row per continuous feature, in this order.
COL = {name: i for i, name in enumerate(CONTINUOUS)}
# The columns a candidate is compared with stable on (compare.py): the tested features (the
# compared ones, then the time per output token) and the error flag.
COMPARISON = (*TESTED, F.ERROR)
# quality.py's metric -> the feature its z-score series names
QUALITY_FEATURE = {"distinct_1": F.DISTINCT_1, "distinct_2": F.DISTINCT_2, "token_entropy": F.TOKEN_ENTROPY,
                   "mean_length": F.COMPLETION_TOKENS}


@dataclass
class Out:
    """A signal to publish (the runner turns it into a ``Signal`` proto): one reading of a
    series of the contract (``eventbus/signals.py``); ``labels`` are series labels only."""
    model: str
    version: str
    detector: str
    feature: str
    statistic: float
    threshold: float | None
    p_value: float | None
    drifted: bool
    reference_size: int = 0
    window_size: int = 0
    time_s: float = 0.0               # event time of the window's end
    labels: dict = field(default_factory=dict)
    detections: int = 0
    events: int = 0
    value: float | None = None        # zscore: the window's measured value
    window_index: int = 0             # zscore: the window's index
    reliability: list = field(default_factory=list)   # ece: calibration.reliability()'s bins
    trend: tuple | None = None        # mann_kendall: (direction, severity, slope)
    recalibration: object = None      # temperature: recalibration.Fit

    @property
    def kind(self) -> int:
        return kind_of(self.detector, self.feature)


def _f(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else 0.0


class ModelState:
    """Everything kept for one model version."""

    def __init__(self, model: str, version: str, s: Settings):
        self.model, self.version, self.s = model, version, s
        self.n_events = 0
        self.n_errors = 0
        self.n_feedback = 0
        self.n_joined = 0
        self.detectors: dict[str, list] = {f: [KSWindow(s.ks_window, alpha=s.ks_alpha),
                                               PSI(s.psi_window, n_bins=s.psi_bins, threshold=s.psi_threshold)]
                                           for f in CONTINUOUS}
        self.detectors[F.MEAN_LOGPROB].append(ADWIN(s.adwin_delta))
        self.detectors[F.ERROR] = [PageHinkley(delta=s.ph_delta, threshold=s.ph_threshold, mode="up")]
        self.interval_events = 0                 # since the last reading, for the error rate
        self.interval_errors = 0
        self.finish = ChiSquare(s.chi2_window, alpha=s.chi2_alpha)
        self.sketches = {f: QuantileSketch() for f in LATENCY}
        self.quality = QualityMonitor(s.quality_window, s.quality_baseline)
        self.trends = {f: TrendMonitor(s.trend_window) for f in CONTINUOUS}
        self.sums = np.zeros(len(CONTINUOUS))     # of the current reading interval, for the trends
        self.counts = np.zeros(len(CONTINUOUS))
        self.calibration = Calibration(s.calibration_bins, s.calibration_window)
        self.joined: collections.deque = collections.deque(maxlen=s.calibration_window)  # (probs, label), latest
        self.fitted_at: int | None = None        # n_joined at the last temperature fit
        self.concept = ADWIN(s.adwin_delta)      # on 1 - correct of joined feedback
        self.scores: collections.deque = collections.deque(maxlen=s.score_window)   # Feedback.score, latest
        self.n_scores = 0
        self.score_drift = ADWIN(s.adwin_delta)
        self.last_time = 0.0

    # -- events ---------------------------------------------------------------------------
    def add_events(self, X: np.ndarray, errors: np.ndarray, finish: list, judged: np.ndarray, lengths: np.ndarray,
                   tokens: list | None, times: np.ndarray, out: list[Out]) -> None:
        """Events of this version, a column each: X (len(CONTINUOUS), n) with NaN where a
        feature is absent; ``judged`` marks the completions the quality monitor judges, with
        their ``lengths`` and ``tokens`` (None when no event has any). Cut where a reading
        is due, so that a reading covers the same events however the fetches fell."""
        start, n, every = 0, len(errors), self.s.signal_every
        while start < n:
            end = min(n, start + every - self.n_events % every)
            j = judged[start:end]
            self._add(X[:, start:end], errors[start:end], finish[start:end], lengths[start:end][j],
                      [t for t, ok in zip(tokens[start:end], j) if ok] if tokens is not None else None,
                      float(times[start:end].max()), out)
            start = end

    def _add(self, X, errors, finish, lengths, tokens, last_time: float, out: list[Out]) -> None:
        n = len(errors)
        n_errors = int(errors.sum())
        self.n_events += n
        self.n_errors += n_errors
        self.interval_events += n
        self.interval_errors += n_errors
        self.last_time = max(self.last_time, last_time)
        for f, i in COL.items():
            col = X[i]
            for d in self.detectors[f]:
                if len(d.update_many(col)):
                    self._drift(d, f, out)
            ok = np.isfinite(col)
            self.sums[i] += col[ok].sum()
            self.counts[i] += ok.sum()
        for d in self.detectors[F.ERROR]:
            if len(d.update_many(errors)):
                self._drift(d, F.ERROR, out)
        fin = [r for r in finish if r]
        if fin and len(self.finish.update_many(fin)):
            self._drift(self.finish, F.FINISH_REASON, out)
        for f in LATENCY:
            col = X[COL[f]]
            col = col[np.isfinite(col) & (col > 0)]
            if len(col):
                self.sketches[f].add_many(col)
        for w in self.quality.update_many(lengths, tokens):
            if not w.baseline:
                for m, z in w.z.items():   # only the metrics the window could measure
                    o = self._out(D.ZSCORE, QUALITY_FEATURE[m], z, 3.0, None, math.isfinite(z) and abs(z) >= 3.0,
                                  0, w.n_completions)
                    o.value, o.window_index = float(getattr(w, m)), w.index
                    out.append(o)
        if self.n_events % self.s.signal_every == 0:
            self._readings(out)

    def _out(self, detector, feature, statistic, threshold, p_value, drifted, ref, win, labels=None) -> Out:
        return Out(self.model, self.version, detector, feature, _f(statistic), threshold, p_value,
                   bool(drifted), int(ref), int(win), self.last_time, labels or {}, events=self.n_events)

    def _reading(self, d, feature: str, drifted: bool | None = None) -> Out | None:
        """The detector's reading, or None when it has seen no value."""
        r = d.reading()
        sizes = r.window_sizes
        if not any(sizes) and not r.n_detections:
            return None
        ref, win = (sizes[0], sizes[1]) if len(sizes) > 1 else (0, sizes[0] if sizes else 0)
        o = self._out(r.detector, feature, r.statistic, r.threshold, r.p_value,
                      r.drifted if drifted is None else drifted, ref, win)
        o.detections = r.n_detections
        return o

    def _drift(self, d, feature: str, out: list[Out]) -> None:
        out.append(self._reading(d, feature, True))

    def _readings(self, out: list[Out]) -> None:
        readings = [self._reading(d, f) for f, ds in self.detectors.items() for d in ds]
        readings.append(self._reading(self.finish, F.FINISH_REASON))
        out.extend(r for r in readings if r is not None)
        if self.interval_events:
            out.append(self._out(D.ERROR_RATE, F.ERROR, self.interval_errors / self.interval_events, None, None,
                                 False, 0, self.interval_events))
            self.interval_events = self.interval_errors = 0
        for f, sk in self.sketches.items():  # quantiles of the events since the last reading
            if sk.count:
                for q, v in zip((D.P50, D.P95, D.P99), sk.quantiles()):
                    out.append(self._out(q, f, v, None, None, False, 0, int(sk.count)))
                self.sketches[f] = QuantileSketch()
        means = np.divide(self.sums, self.counts, out=np.full_like(self.sums, NAN), where=self.counts > 0)
        for f, i in COL.items():
            if not math.isfinite(means[i]):
                continue
            t = self.trends[f].update(float(means[i]))
            if t is not None:
                o = self._out(D.MANN_KENDALL, f, t.z, self.trends[f].alpha, t.p_value, t.severity != "none", 0, t.n)
                o.trend = (t.trend, t.severity, float(t.slope))
                out.append(o)
        self.sums[:] = 0
        self.counts[:] = 0

    # -- feedback -------------------------------------------------------------------------
    def add_joined(self, pairs: list[tuple[list[float], int]], out: list[Out]) -> None:
        """Joined feedback, in order: (label probabilities, index of the true label)."""
        every = self.s.calibration_every
        i = 0
        while i < len(pairs):
            j = min(len(pairs), i + every - self.calibration.n_seen % every)   # the next signal is due at j
            self.joined.extend(pairs[i:j])
            for probs, labels in _same_length_runs(pairs[i:j]):
                self.calibration.update_many(probs, labels)
                wrong = (np.argmax(probs, axis=1) != labels).astype(np.float64)
                self.concept.update_many(wrong, on_drift=lambda _: out.append(
                    self._reading(self.concept, F.PREDICTION_ERROR, True)))
            self.n_joined += j - i
            if self.calibration.n_seen % every == 0:
                self._calibration(out)
            i = j

    def _refit_due(self, ece: float) -> bool:
        """A temperature is fitted only for a miscalibrated version, with enough feedback."""
        s = self.s
        return (ece >= s.ece_threshold and len(self.joined) >= s.recalibration_min
                and (self.fitted_at is None or self.n_joined - self.fitted_at >= s.recalibration_every))

    def _calibration(self, out: list[Out]) -> None:
        c, n = self.calibration, self.calibration.n
        out.append(self._out(D.ACCURACY, F.LABEL, c.accuracy, None, None, False, 0, n))
        out.append(self._out(D.BRIER, F.LABEL, c.brier, None, None, False, 0, n))
        for detector, strategy in ((D.ECE, "width"), (D.ECE_EQUAL_MASS, "mass")):
            e = c.ece(strategy)
            o = self._out(detector, F.LABEL, e, self.s.ece_threshold, None, e >= self.s.ece_threshold, 0, n)
            o.reliability = c.reliability(strategy)
            out.append(o)
        if self._refit_due(c.ece()):
            self.fitted_at = self.n_joined
            fit = fit_temperature(list(self.joined), bins=self.s.calibration_bins)
            o = self._out(D.TEMPERATURE, F.LABEL, fit.temperature, None, None, False, 0, len(self.joined))
            o.recalibration = fit
            out.append(o)
        concept = self._reading(self.concept, F.PREDICTION_ERROR)
        if concept is not None:
            out.append(concept)

    def add_scores(self, scores: np.ndarray, out: list[Out]) -> None:
        """Feedback scores, in order: ADWIN on the stream, and every ``score_every`` scores
        the mean of the latest ``score_window`` with ADWIN's reading."""
        every, i = self.s.score_every, 0
        while i < len(scores):
            j = min(len(scores), i + every - self.n_scores % every)
            part = scores[i:j]
            self.scores.extend(part.tolist())
            self.score_drift.update_many(part, on_drift=lambda _: out.append(
                self._reading(self.score_drift, F.SCORE, True)))
            self.n_scores += j - i
            if self.n_scores % every == 0:
                out.append(self._out(D.MEAN, F.SCORE, sum(self.scores) / len(self.scores), None, None, False, 0,
                                     len(self.scores)))
                out.append(self._reading(self.score_drift, F.SCORE))
            i = j

    # -- checkpoints ----------------------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "model": self.model, "version": self.version, "n_events": self.n_events, "n_errors": self.n_errors,
            "interval_events": self.interval_events, "interval_errors": self.interval_errors,
            "n_feedback": self.n_feedback, "n_joined": self.n_joined, "last_time": self.last_time,
            "detectors": {f: [d.to_state() for d in ds] for f, ds in self.detectors.items()},
            "finish": self.finish.to_state(),
            "sketches": {f: s.to_state() for f, s in self.sketches.items()},
            "quality": self.quality.to_state(),
            "trends": {f: t.to_state() for f, t in self.trends.items()},
            "sums": self.sums.tolist(), "counts": self.counts.tolist(),
            "calibration": self.calibration.to_state(), "concept": self.concept.to_state(),
            "joined": [[p, y] for p, y in self.joined], "fitted_at": self.fitted_at,
            "scores": list(self.scores), "n_scores": self.n_scores, "score_drift": self.score_drift.to_state(),
        }

    @classmethod
    def from_state(cls, st: dict, s: Settings) -> "ModelState":
        m = cls(st["model"], st["version"], s)
        for k in ("n_events", "n_errors", "n_feedback", "n_joined", "last_time", "interval_events", "interval_errors"):
            setattr(m, k, st[k])
        m.detectors = {f: [type(d).from_state(x) for d, x in zip(m.detectors[f], xs)]
                       for f, xs in st["detectors"].items()}
        m.finish = ChiSquare.from_state(st["finish"])
        m.sketches = {f: QuantileSketch.from_state(x) for f, x in st["sketches"].items()}
        m.quality = QualityMonitor.from_state(st["quality"])
        m.trends = {f: TrendMonitor.from_state(x) for f, x in st["trends"].items()}
        m.sums, m.counts = np.asarray(st["sums"]), np.asarray(st["counts"])
        m.calibration = Calibration.from_state(st["calibration"])
        m.concept = ADWIN.from_state(st["concept"])
        m.joined.extend((p, y) for p, y in st["joined"])
        m.fitted_at = st["fitted_at"]
        m.scores.extend(st["scores"])
        m.n_scores = st["n_scores"]
        m.score_drift = ADWIN.from_state(st["score_drift"])
        return m

    def summary(self) -> dict:
        """Figures that must come out the same however often the processor restarted."""
        return {"n_events": self.n_events, "n_errors": self.n_errors, "n_feedback": self.n_feedback,
                "n_joined": self.n_joined, "calibration": self.calibration.summary(),
                "detectors": {f: [d.reading().as_dict() for d in ds] for f, ds in self.detectors.items()},
                "finish": self.finish.reading().as_dict(),
                "latency": {f: s.quantiles() if s.count else None for f, s in self.sketches.items()}}


def _same_length_runs(pairs: list):
    """Runs of consecutive pairs with as many probabilities: (probabilities (n, k), labels (n,))."""
    start = 0
    for i in range(1, len(pairs) + 1):
        if i == len(pairs) or len(pairs[i][0]) != len(pairs[start][0]):
            run = pairs[start:i]
            yield np.array([p for p, _ in run]), np.array([y for _, y in run], dtype=np.int64)
            start = i


def unusable(message) -> str:
    """Why an event or feedback cannot be measured (it goes to the dead-letter topic), or ""."""
    if not message.model:
        return f"{message.DESCRIPTOR.full_name} without a model: no model version to measure it for"
    if type(message) is events_pb2.FeedbackEvent:
        return "" if math.isfinite(message.score) else "FeedbackEvent.score must be a finite number"
    probs = message.label_probabilities
    if probs and not all(0.0 <= p <= 1.0 for p in probs.values()):
        return "InferenceEvent.label_probabilities: each must be a probability, from 0 to 1"
    return ""


@dataclass
class Batch:
    """The features of a list of InferenceEvents, a column per feature."""
    X: np.ndarray          # (len(CONTINUOUS), n); NaN where a feature is absent
    errors: np.ndarray     # 1.0 where the status is not OK
    finish: list           # finish reasons ("" where generation never ran)
    judged: np.ndarray     # whether the quality monitor judges the completion: OK and not Classify
    lengths: np.ndarray    # completion tokens
    tokens: dict           # position -> the completion's token hashes (or its words, where only the
                           # text is sent), of the judged events that carry either
    times: np.ndarray      # event time, seconds
    routes: np.ndarray     # vigil.events.v1.Route
    token_seconds: np.ndarray  # per output token after the first (the total for one token); NaN unless OK
    groups: dict           # (model, version) -> positions, in order of first appearance
    labelled: list         # (position, labels sorted, their probabilities) of the events with
                           # label probabilities


def read_events(events: list) -> Batch:
    """Each protobuf field is read for the whole list at once: a list comprehension per
    field costs a fraction of building a row per event. Sub-messages are read as they go
    by, not kept: thousands of live wrappers would wake the garbage collector."""
    n = len(events)
    ok = np.array([e.status for e in events]) == events_pb2.STATUS_OK
    conf = np.array([e.HasField("confidence") for e in events], dtype=bool)
    confidence = np.fromiter((x for c in (e.confidence for e in events)
                              for x in (c.mean_logprob, c.mean_entropy, c.min_top1_prob)), np.float64, 3 * n)
    first = np.array([e.first_token_seconds for e in events], dtype=np.float64)
    lengths = np.array([e.completion_tokens for e in events], dtype=np.int64)
    labelled, top = [], []
    for i, k in enumerate([len(e.label_probabilities) for e in events]):
        if k:
            items = list(events[i].label_probabilities.items())
            top.append(max(p for _, p in items))     # in the map's order, as max(values()) takes them
            items.sort()
            labelled.append((i, [label for label, _ in items], [p for _, p in items]))
    X = np.full((len(CONTINUOUS), n), NAN)
    X[0] = [e.prompt_tokens for e in events]
    X[1] = np.where(ok, lengths, NAN)
    X[2:5] = np.where(conf, confidence.reshape(n, 3).T, NAN)
    X[5] = np.where(ok, [e.total_seconds for e in events], NAN)
    X[6] = np.where(ok & (first > 0), first, NAN)
    X[7, [i for i, _, _ in labelled]] = top
    judged = ok & np.array([e.method != "Classify" for e in events])
    tokens = {}
    for i in np.flatnonzero(judged).tolist():
        e = events[i]
        if e.completion_token_hashes:
            tokens[i] = list(e.completion_token_hashes)
        elif e.HasField("completion_text"):
            tokens[i] = e.completion_text.split()
    times = np.array([t.seconds + t.nanos * 1e-9 for t in (e.time for e in events)], dtype=np.float64)
    index: dict[tuple, int] = {}
    codes = np.array([index.setdefault((e.model, e.version), len(index)) for e in events])
    groups = {key: np.flatnonzero(codes == g) for key, g in index.items()}
    total = X[5]
    decoding = (lengths >= 2) & (first > 0) & (total > first)
    token_seconds = np.where(decoding, (total - first) / np.maximum(lengths - 1, 1), total)
    return Batch(X, (~ok).astype(np.float64), [e.finish_reason for e in events], judged, lengths, tokens, times,
                 np.array([e.route for e in events]), token_seconds, groups, labelled)


class PartitionState:
    """All state of one partition number of vigil.inference.events and vigil.feedback.

    The comparison of a model's candidate versions with its stable version (compare.py)
    sees the versions whose events are in this partition: all of them when the records are
    keyed by model, as they must be for it; keyed by model and version, only those whose
    keys happen to share a partition number (the others are not compared, never wrongly).
    """

    def __init__(self, partition: int, settings: Settings):
        self.partition = partition
        self.s = settings
        self.offsets: dict[str, int] = {}         # topic -> next offset to read
        self.models: dict[str, ModelState] = {}
        self.comparisons: dict[str, VersionComparison] = {}   # model -> its versions compared
        self.pending_events: dict[str, tuple] = {}    # request_id -> (key, labels, probs, time)
        self.pending_feedback: dict[str, tuple] = {}  # request_id -> (label, time)
        self.watermark = 0.0                          # the latest event time seen
        self.expired = 0

    def model(self, model: str, version: str) -> ModelState:
        key = f"{model}/{version}"
        m = self.models.get(key)
        if m is None:
            m = self.models[key] = ModelState(model, version, self.s)
        return m

    def fresh(self, topic: str, records: list) -> list:
        """The records new to this state (noted as read): the guard against counting a
        record twice when a fetch overlaps what a checkpoint already holds."""
        start = self.offsets.get(topic, 0)
        new = [r for r in records if r.offset >= start]
        if new:
            self.offsets[topic] = new[-1].offset + 1
        return new

    def apply_events(self, events: list, out: list[Out]) -> None:
        if not events:
            return
        batch = read_events(events)
        joins: dict[ModelState, list] = {}
        compared: dict[tuple, list] = {}
        for i, labels, probs in batch.labelled:
            ev = events[i]
            if not ev.request_id:
                continue
            entry = (ev.model, ev.version, labels, probs, float(batch.times[i]))
            fb = self.pending_feedback.pop(ev.request_id, None)
            if fb is not None:
                self._join(entry, fb[0], joins, compared)
            elif len(self.pending_events) < self.s.max_pending:
                self.pending_events[ev.request_id] = entry
        for m, pairs in joins.items():
            m.add_joined(pairs, out)
        self._compare_feedback(compared, out)
        self.watermark = max(self.watermark, float(batch.times.max()))
        for (model, version), idx in batch.groups.items():
            tokens = [batch.tokens.get(i) for i in idx.tolist()] if batch.tokens else None
            self.model(model, version).add_events(
                batch.X[:, idx], batch.errors[idx], [batch.finish[i] for i in idx.tolist()], batch.judged[idx],
                batch.lengths[idx], tokens, batch.times[idx], out)
        if batch.routes.any():
            self._compare(batch, out)

    def comparison(self, model: str) -> VersionComparison:
        cmp = self.comparisons.get(model)
        if cmp is None:
            s = self.s
            cmp = self.comparisons[model] = VersionComparison(
                COMPARISON, s.compare_window, s.compare_every, s.compare_min, error_margin=s.compare_error_margin,
                accuracy_margin=s.compare_accuracy_margin, bins=s.calibration_bins)
        return cmp

    def _compared(self, model: str, r, out: list[Out]) -> None:
        """A comparison's result as a signal: a test is drifted below ``compare_alpha``, a
        measurement (a median, an ECE) never."""
        s = self.s
        tested = r.p_value is not None
        o = Out(model, r.candidate, r.detector, r.feature, _f(r.statistic), s.compare_alpha if tested else None,
                r.p_value, tested and r.p_value < s.compare_alpha, r.n_reference, r.n_candidate, r.time,
                {"reference_version": r.reference}, events=r.events)
        o.value = r.value
        out.append(o)

    def _compare(self, batch: Batch, out: list[Out]) -> None:
        values = np.column_stack((batch.X[[COL[f] for f in COMPARED]].T, batch.token_seconds, batch.errors))
        by_model: dict[str, dict] = {}
        for (model, version), idx in batch.groups.items():
            by_model.setdefault(model, {})[version] = idx
        for model, rows in by_model.items():
            if not any(batch.routes[idx].any() for idx in rows.values()):
                continue
            cmp = self.comparison(model)
            for version in cmp.add(rows, batch.routes, values, batch.finish, batch.times):
                for r in cmp.compare(version):
                    self._compared(model, r, out)

    def _compare_feedback(self, compared: dict, out: list[Out]) -> None:
        """Joined feedback, per version: (top-label probability, right or not, event time)."""
        for (model, version), rows in compared.items():
            cmp = self.comparison(model)
            conf, correct, times = (np.array(c, dtype=np.float64) for c in zip(*rows))
            if cmp.add_feedback(version, conf, correct, times):
                for r in cmp.compare_feedback(version):
                    self._compared(model, r, out)

    def apply_feedback(self, feedbacks: list, out: list[Out]) -> None:
        joins: dict[ModelState, list] = {}
        compared: dict[tuple, list] = {}
        scores: dict[ModelState, list] = {}
        for fb in feedbacks:
            ts = fb.time
            t = ts.seconds + ts.nanos * 1e-9
            if t > self.watermark:
                self.watermark = t
            request_id = fb.request_id
            truth = fb.WhichOneof("truth")
            if truth == "score":
                scores.setdefault(self.model(fb.model, fb.version), []).append(fb.score)
            if not request_id or truth != "label":
                self.model(fb.model, fb.version).n_feedback += 1
                continue
            entry = self.pending_events.pop(request_id, None)
            if entry is not None:
                self._join(entry, fb.label, joins, compared)
            elif len(self.pending_feedback) < self.s.max_pending:
                self.pending_feedback[request_id] = (fb.label, t)
        for m, pairs in joins.items():
            m.add_joined(pairs, out)
        self._compare_feedback(compared, out)
        for m, values in scores.items():
            m.add_scores(np.array(values), out)

    def _join(self, entry: tuple, label: str, joins: dict, compared: dict) -> None:
        model, version, labels, probs, time = entry
        m = self.model(model, version)
        m.n_feedback += 1
        if label in labels:
            joins.setdefault(m, []).append((probs, labels.index(label)))
        else:  # a true label the classifier was not offered: a certain miss
            joins.setdefault(m, []).append((probs + [0.0], len(labels)))
        top = int(np.argmax(probs))   # the first on ties, as the calibration takes it
        compared.setdefault((model, version), []).append((probs[top], labels[top] == label, time))

    def expire(self) -> None:
        """Drop joins older than the TTL (in event time, so a replay drops the same ones)."""
        horizon = self.watermark - self.s.feedback_ttl_s
        for pending, tpos in ((self.pending_events, 4), (self.pending_feedback, 1)):
            old = [k for k, v in pending.items() if v[tpos] < horizon]
            for k in old:
                del pending[k]
            self.expired += len(old)

    def to_state(self) -> dict:
        return {"format": FORMAT, "partition": self.partition, "offsets": self.offsets, "watermark": self.watermark,
                "expired": self.expired, "settings": asdict(self.s),
                "models": {k: m.to_state() for k, m in self.models.items()},
                "comparisons": {k: c.to_state() for k, c in self.comparisons.items()},
                "pending_events": self.pending_events, "pending_feedback": self.pending_feedback}

    @classmethod
    def from_state(cls, st: dict, settings: Settings) -> "PartitionState":
        p = cls(st["partition"], settings)
        p.offsets = {k: int(v) for k, v in st["offsets"].items()}
        p.watermark, p.expired = st["watermark"], st["expired"]
        if st.get("format") == FORMAT:
            p.models = {k: ModelState.from_state(m, settings) for k, m in st["models"].items()}
            p.comparisons = {k: VersionComparison.from_state(
                c, COMPARISON, settings.compare_window, settings.compare_every, settings.compare_min,
                error_margin=settings.compare_error_margin, accuracy_margin=settings.compare_accuracy_margin,
                bins=settings.calibration_bins) for k, c in st["comparisons"].items()}
        else:
            log.warning("partition %d: checkpoint of format %s (this processor writes %d): detectors start "
                        "afresh from its offsets", p.partition, st.get("format", 1), FORMAT)
        p.pending_events = {k: tuple(v) for k, v in st["pending_events"].items()}
        p.pending_feedback = {k: tuple(v) for k, v in st["pending_feedback"].items()}
        return p

    def encode(self) -> bytes:
        return zlib.compress(json.dumps(self.to_state(), separators=(",", ":")).encode(), 1)

    @classmethod
    def decode(cls, data: bytes, settings: Settings) -> "PartitionState":
        return cls.from_state(json.loads(zlib.decompress(data)), settings)

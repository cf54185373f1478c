"""The processor's computation: events in, per model version state, signals out.

No Kafka here (the runner in ``runner.py`` feeds it): ``PartitionState.apply`` takes the
decoded records of one partition number, in order, for both ``vigil.inference.events``
and ``vigil.feedback`` (an event and its feedback share a key, so they land in the same
partition number of the two topics), and returns the signals to publish. The whole state
of a partition number (per model version: detectors, sketches, calibration, quality,
trends; the pending feedback joins; the next offset of each topic) round-trips through
``to_state`` / ``from_state`` so a checkpoint carries state and offsets together.

Work is done in batches: the records of one fetch are grouped by model version and every
detector gets ``update_many`` over the batch's column, which is what makes the
processor fast; ``update_many`` gives the same results as ``update`` value by value.
Readings (every detector's current statistic) are published every ``signal_every``
events of a model version, at the batch boundary that crosses the multiple, and a
drifted signal whenever a detector detects inside a batch (its statistic is read at the
end of that batch).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from stream_processors.calibration import Calibration
from stream_processors.detectors import ADWIN, PSI, ChiSquare, KSWindow
from stream_processors.quality import METRICS as QUALITY_METRICS, QualityMonitor
from stream_processors.sketch import QuantileSketch
from stream_processors.trend import TrendMonitor

STATUS_OK = 1
NAN = float("nan")

# Continuous features, in column order of the feature matrix.
CONTINUOUS = ("prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob",
              "total_seconds", "first_token_seconds", "top_label_prob")
COL = {name: i for i, name in enumerate(CONTINUOUS)}
LATENCY = ("total_seconds", "first_token_seconds")
KIND_DRIFT, KIND_CALIBRATION, KIND_QUALITY, KIND_LATENCY = 1, 2, 3, 4


@dataclass
class Settings:
    ks_window: int = 500
    ks_alpha: float = 1e-6
    psi_window: int = 1000
    psi_bins: int = 10
    psi_threshold: float = 0.25
    adwin_delta: float = 0.002
    chi2_window: int = 1000
    chi2_alpha: float = 1e-6
    signal_every: int = 1000          # readings per model version every this many events
    calibration_every: int = 100      # calibration signals every this many joined feedbacks
    calibration_bins: int = 10
    calibration_window: int = 10_000
    ece_threshold: float = 0.1
    feedback_ttl_s: float = 3600.0    # event time: an unmatched event or feedback is dropped after this
    max_pending: int = 200_000        # per partition, each way
    quality_window: int = 100
    trend_window: int = 30

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Out:
    """A signal to publish (the runner turns it into a ``Signal`` proto)."""
    model: str
    version: str
    kind: int
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
        self.detectors["mean_logprob"].append(ADWIN(s.adwin_delta))
        self.detectors["error"] = [ADWIN(s.adwin_delta)]
        self.finish = ChiSquare(s.chi2_window, alpha=s.chi2_alpha)
        self.sketches = {f: QuantileSketch() for f in LATENCY}
        self.quality = QualityMonitor(s.quality_window)
        self.trends = {f: TrendMonitor(s.trend_window) for f in CONTINUOUS}
        self.sums = np.zeros(len(CONTINUOUS))     # of the current reading interval, for the trends
        self.counts = np.zeros(len(CONTINUOUS))
        self.calibration = Calibration(s.calibration_bins, s.calibration_window)
        self.concept = ADWIN(s.adwin_delta)      # on 1 - correct of joined feedback
        self.last_time = 0.0

    # -- events ---------------------------------------------------------------------------
    def add_events(self, X: np.ndarray, errors: np.ndarray, finish: list, texts: list,
                   times: list, out: list[Out]) -> None:
        """X: (n, len(CONTINUOUS)) with NaN where a feature is absent."""
        n = len(errors)
        before = self.n_events
        self.n_events += n
        self.n_errors += int(errors.sum())
        self.last_time = max(self.last_time, max(times))
        for f, i in COL.items():
            col = X[:, i]
            for d in self.detectors[f]:
                if len(d.update_many(col)):
                    self._drift(d, f, out)
            ok = np.isfinite(col)
            self.sums[i] += col[ok].sum()
            self.counts[i] += ok.sum()
        for d in self.detectors["error"]:
            if len(d.update_many(errors)):
                self._drift(d, "error", out)
        fin = [r for r in finish if r]
        if fin and len(self.finish.update_many(fin)):
            self._drift(self.finish, "finish_reason", out)
        for f in LATENCY:
            col = X[:, COL[f]]
            col = col[np.isfinite(col) & (col > 0)]
            if len(col):
                self.sketches[f].add_many(col)
        for tokens, length in texts:
            w = self.quality.update(tokens, length)
            if w is not None and not w.baseline:
                for m in QUALITY_METRICS:
                    z = w.z.get(m, NAN)
                    out.append(self._out(KIND_QUALITY, "zscore", m, _f(z), 3.0, None,
                                         bool(math.isfinite(z) and abs(z) >= 3.0), 0, w.n_completions,
                                         {"value": repr(getattr(w, m)), "window": str(w.index)}))
        if self.n_events // self.s.signal_every > before // self.s.signal_every:
            self._readings(out)

    def _out(self, kind, detector, feature, statistic, threshold, p_value, drifted, ref, win, labels=None) -> Out:
        return Out(self.model, self.version, kind, detector, feature, _f(statistic), threshold, p_value,
                   bool(drifted), int(ref), int(win), self.last_time, labels or {})

    def _reading(self, d, feature: str, drifted: bool | None = None, kind: int = KIND_DRIFT) -> Out:
        r = d.reading()
        sizes = r.window_sizes
        ref, win = (sizes[0], sizes[1]) if len(sizes) > 1 else (0, sizes[0] if sizes else 0)
        return self._out(kind, r.detector, feature, r.statistic, r.threshold, r.p_value,
                         r.drifted if drifted is None else drifted, ref, win,
                         {"detections": str(r.n_detections), "events": str(self.n_events)})

    def _drift(self, d, feature: str, out: list[Out]) -> None:
        kind = KIND_QUALITY if feature == "error" else KIND_LATENCY if feature in LATENCY else KIND_DRIFT
        out.append(self._reading(d, feature, True, kind))

    def _readings(self, out: list[Out]) -> None:
        for f, ds in self.detectors.items():
            kind = KIND_QUALITY if f == "error" else KIND_LATENCY if f in LATENCY else KIND_DRIFT
            for d in ds:
                out.append(self._reading(d, f, kind=kind))
        out.append(self._reading(self.finish, "finish_reason"))
        for f, sk in self.sketches.items():
            if sk.count:
                for q, v in zip(("p50", "p95", "p99"), sk.quantiles()):
                    out.append(self._out(KIND_LATENCY, q, f, v, None, None, False, 0, int(sk.count)))
        means = np.divide(self.sums, self.counts, out=np.full_like(self.sums, NAN), where=self.counts > 0)
        for f, i in COL.items():
            if not math.isfinite(means[i]):
                continue
            t = self.trends[f].update(float(means[i]))
            if t is not None:
                out.append(self._out(KIND_DRIFT, "mann_kendall", f, t.z, self.trends[f].alpha, t.p_value,
                                     t.severity != "none", 0, t.n,
                                     {"severity": t.severity, "trend": t.trend, "slope": repr(t.slope)}))
        self.sums[:] = 0
        self.counts[:] = 0

    # -- feedback -------------------------------------------------------------------------
    def add_joined(self, probs: list[float], label_index: int, out: list[Out]) -> None:
        self.n_joined += 1
        before = self.calibration.n_seen
        self.calibration.update(probs, label_index)
        correct = int(np.argmax(probs) == label_index) if label_index < len(probs) else 0
        self.concept.update(1 - correct)
        if self.concept.drift_detected:
            out.append(self._reading(self.concept, "prediction_error", True, KIND_QUALITY))
        if self.calibration.n_seen // self.s.calibration_every > before // self.s.calibration_every:
            self._calibration(out)

    def _calibration(self, out: list[Out]) -> None:
        c, n = self.calibration, self.calibration.n
        out.append(self._out(KIND_QUALITY, "accuracy", "label", c.accuracy, None, None, False, 0, n))
        out.append(self._out(KIND_CALIBRATION, "brier", "label", c.brier, None, None, False, 0, n))
        for strategy in ("width", "mass"):
            e = c.ece(strategy)
            out.append(self._out(KIND_CALIBRATION, "ece", "label", e, self.s.ece_threshold, None,
                                 e >= self.s.ece_threshold, 0, n,
                                 {"binning": "equal_" + strategy,
                                  "reliability": json.dumps(c.reliability(strategy), separators=(",", ":"))}))
        out.append(self._reading(self.concept, "prediction_error", kind=KIND_QUALITY))

    # -- checkpoints ----------------------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "model": self.model, "version": self.version, "n_events": self.n_events, "n_errors": self.n_errors,
            "n_feedback": self.n_feedback, "n_joined": self.n_joined, "last_time": self.last_time,
            "detectors": {f: [d.to_state() for d in ds] for f, ds in self.detectors.items()},
            "finish": self.finish.to_state(),
            "sketches": {f: s.to_state() for f, s in self.sketches.items()},
            "quality": self.quality.to_state(),
            "trends": {f: t.to_state() for f, t in self.trends.items()},
            "sums": self.sums.tolist(), "counts": self.counts.tolist(),
            "calibration": self.calibration.to_state(), "concept": self.concept.to_state(),
        }

    @classmethod
    def from_state(cls, st: dict, s: Settings) -> "ModelState":
        m = cls(st["model"], st["version"], s)
        for k in ("n_events", "n_errors", "n_feedback", "n_joined", "last_time"):
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
        return m

    def summary(self) -> dict:
        """Figures that must come out the same however often the processor restarted."""
        return {"n_events": self.n_events, "n_errors": self.n_errors, "n_feedback": self.n_feedback,
                "n_joined": self.n_joined, "calibration": self.calibration.summary(),
                "detectors": {f: [d.reading().as_dict() for d in ds] for f, ds in self.detectors.items()},
                "finish": self.finish.reading().as_dict(),
                "latency": {f: s.quantiles() if s.count else None for f, s in self.sketches.items()}}


def features(ev) -> tuple:
    """(continuous row, error 0/1, finish reason, quality input, event time) of an InferenceEvent."""
    conf = ev.confidence if ev.HasField("confidence") else None
    probs = ev.label_probabilities
    ok = ev.status == STATUS_OK
    row = (float(ev.prompt_tokens), float(ev.completion_tokens) if ok else NAN,
           conf.mean_logprob if conf is not None else NAN, conf.mean_entropy if conf is not None else NAN,
           conf.min_top1_prob if conf is not None else NAN,
           ev.total_seconds if ok else NAN, ev.first_token_seconds if ok and ev.first_token_seconds > 0 else NAN,
           max(probs.values()) if probs else NAN)
    text = None
    if ok and ev.method != "Classify":
        text = (ev.completion_text if ev.HasField("completion_text") else None, ev.completion_tokens)
    return row, 0.0 if ok else 1.0, ev.finish_reason, text, ev.time.seconds + ev.time.nanos * 1e-9


class PartitionState:
    """All state of one partition number of vigil.inference.events and vigil.feedback."""

    def __init__(self, partition: int, settings: Settings):
        self.partition = partition
        self.s = settings
        self.offsets: dict[str, int] = {}         # topic -> next offset to read
        self.models: dict[str, ModelState] = {}
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

    def accept(self, topic: str, offset: int) -> bool:
        """Whether a record is new to this state (and note it as read): the guard against
        counting a record twice when a fetch overlaps what a checkpoint already holds."""
        if offset < self.offsets.get(topic, 0):
            return False
        self.offsets[topic] = offset + 1
        return True

    def apply_events(self, events: list, out: list[Out]) -> None:
        groups: dict[tuple, list] = {}
        for ev in events:
            groups.setdefault((ev.model, ev.version), []).append(ev)
            if ev.label_probabilities and ev.request_id:
                t = ev.time.seconds + ev.time.nanos * 1e-9
                labels = sorted(ev.label_probabilities)
                entry = (ev.model, ev.version, labels, [ev.label_probabilities[k] for k in labels], t)
                fb = self.pending_feedback.pop(ev.request_id, None)
                if fb is not None:
                    self._join(entry, fb[0], out)
                elif len(self.pending_events) < self.s.max_pending:
                    self.pending_events[ev.request_id] = entry
        for (model, version), evs in groups.items():
            rows, errors, finish, texts, times = [], [], [], [], []
            for ev in evs:
                row, err, fin, text, t = features(ev)
                rows.append(row)
                errors.append(err)
                finish.append(fin)
                times.append(t)
                if text is not None:
                    texts.append(text)
            self.watermark = max(self.watermark, max(times))
            self.model(model, version).add_events(np.array(rows, dtype=np.float64), np.array(errors),
                                                  finish, texts, times, out)

    def apply_feedback(self, fb, out: list[Out]) -> None:
        t = fb.time.seconds + fb.time.nanos * 1e-9
        self.watermark = max(self.watermark, t)
        if fb.WhichOneof("truth") != "label" or not fb.request_id:
            self.model(fb.model, fb.version).n_feedback += 1
            return
        entry = self.pending_events.pop(fb.request_id, None)
        if entry is not None:
            self._join(entry, fb.label, out)
        elif len(self.pending_feedback) < self.s.max_pending:
            self.pending_feedback[fb.request_id] = (fb.label, t)

    def _join(self, entry: tuple, label: str, out: list[Out]) -> None:
        model, version, labels, probs, _ = entry
        m = self.model(model, version)
        m.n_feedback += 1
        if label in labels:
            m.add_joined(probs, labels.index(label), out)
        else:  # a true label the classifier was not offered: a certain miss
            m.add_joined(probs + [0.0], len(labels), out)

    def expire(self) -> None:
        """Drop joins older than the TTL (in event time, so a replay drops the same ones)."""
        horizon = self.watermark - self.s.feedback_ttl_s
        for pending, tpos in ((self.pending_events, 4), (self.pending_feedback, 1)):
            old = [k for k, v in pending.items() if v[tpos] < horizon]
            for k in old:
                del pending[k]
            self.expired += len(old)

    def to_state(self) -> dict:
        return {"partition": self.partition, "offsets": self.offsets, "watermark": self.watermark,
                "expired": self.expired, "settings": asdict(self.s),
                "models": {k: m.to_state() for k, m in self.models.items()},
                "pending_events": self.pending_events, "pending_feedback": self.pending_feedback}

    @classmethod
    def from_state(cls, st: dict, settings: Settings) -> "PartitionState":
        p = cls(st["partition"], settings)
        p.offsets = {k: int(v) for k, v in st["offsets"].items()}
        p.watermark, p.expired = st["watermark"], st["expired"]
        p.models = {k: ModelState.from_state(m, settings) for k, m in st["models"].items()}
        p.pending_events = {k: tuple(v) for k, v in st["pending_events"].items()}
        p.pending_feedback = {k: tuple(v) for k, v in st["pending_feedback"].items()}
        return p

    def encode(self) -> bytes:
        return zlib.compress(json.dumps(self.to_state(), separators=(",", ":")).encode(), 1)

    @classmethod
    def decode(cls, data: bytes, settings: Settings) -> "PartitionState":
        return cls.from_state(json.loads(zlib.decompress(data)), settings)

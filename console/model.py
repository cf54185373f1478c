"""What the page shows, kept in bounded memory: every series is a ring buffer with a fixed
cap, and every map of series forgets its least recently updated entry beyond its own
cap, so memory stays flat however long the topics run.

`apply(message)` takes a decoded record of vigil.signals, vigil.alerts, vigil.rollout or
vigil.inference.events and returns the change to send to the pages (or None);
`snapshot()` is the whole state, in the same shapes.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from eventbus.signals import series_labels
from protos import events_pb2

SIGNAL_COLUMNS = ("t", "statistic", "threshold", "drifted", "p_value")


@dataclass(frozen=True)
class Caps:
    readings: int = 360          # per signal series
    series: int = 1000           # signal series
    decisions: int = 200         # rollout decisions kept per model
    models: int = 100
    alerts: int = 500            # alerts (by fingerprint)
    alert_changes: int = 500     # the latest state changes of all alerts
    versions: int = 200          # model versions with request figures
    recent_events: int = 4096    # per version, for the figures of the last window
    bucket_s: float = 5.0        # request figures over time: one point per bucket
    buckets: int = 720           # an hour of 5 s buckets
    window_s: float = 60.0       # the current figures are over this many seconds


class Bounded(OrderedDict):
    """A map that forgets its least recently updated entry beyond `cap`."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def touch(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.cap:
            self.popitem(last=False)
        return value


def finite(x) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def seconds(ts) -> float | None:
    return ts.seconds + ts.nanos / 1e9 if (ts.seconds or ts.nanos) else None


def enum_name(enum, value: int, prefix: str) -> str:
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def quantile(ordered: list[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def figures(samples, span: float) -> dict:
    """Request figures of (t, ok, total_seconds, first_token_seconds, completion_tokens)
    samples over `span` seconds."""
    ok = [s for s in samples if s[1]]
    total = sorted(s[2] for s in ok)
    first = sorted(s[3] for s in ok if s[3] > 0)
    n, errors = len(samples), len(samples) - len(ok)
    return {"requests": n, "rate": n / span, "errors": errors, "error_rate": errors / n if n else None,
            "p50": quantile(total, 0.5), "p95": quantile(total, 0.95), "p99": quantile(total, 0.99),
            "ttft_p50": quantile(first, 0.5), "ttft_p95": quantile(first, 0.95),
            "tokens_per_s": sum(s[4] for s in samples) / span}


class Traffic:
    """One version's requests: the latest events for the current figures, and a point of
    figures per bucket of event time."""

    def __init__(self, model: str, version: str, caps: Caps):
        self.model, self.version, self.caps = model, version, caps
        self.recent: deque = deque(maxlen=caps.recent_events)
        self.points: deque = deque(maxlen=caps.buckets)
        self.bucket: deque = deque(maxlen=caps.recent_events)
        self.bucket_start: float | None = None

    def add(self, sample: tuple) -> None:
        start = sample[0] - sample[0] % self.caps.bucket_s
        if self.bucket_start is None or start > self.bucket_start:
            if self.bucket:
                self.points.append(self._point())
                self.bucket.clear()
            self.bucket_start = start
        self.bucket.append(sample)
        self.recent.append(sample)

    def _point(self) -> dict:
        return {"t": self.bucket_start, **figures(self.bucket, self.caps.bucket_s)}

    def to_dict(self, now: float, points: int | None = None) -> dict:
        """The current figures and the points over time, the open bucket last; `points`
        keeps only that many of the latest."""
        since = now - self.caps.window_s
        out = list(self.points) if points is None else list(self.points)[-points:]
        if self.bucket:
            out.append(self._point())
        return {"model": self.model, "version": self.version,
                "current": figures([s for s in self.recent if s[0] > since], self.caps.window_s),
                "points": out}


class Series:
    """One signal series: its readings over time, and the latest reading in full."""

    def __init__(self, key: str, m: events_pb2.Signal, caps: Caps):
        self.head = {"id": key, "model": m.model, "version": m.version, "detector": m.detector,
                     "feature": m.feature, "labels": series_labels(m.labels),
                     "kind": enum_name(events_pb2.SignalKind, m.kind, "SIGNAL_KIND_")}
        self.readings: deque = deque(maxlen=caps.readings)
        self.latest: dict = {}

    def add(self, m: events_pb2.Signal, t: float) -> list:
        threshold = m.threshold if m.HasField("threshold") else None
        p_value = m.p_value if m.HasField("p_value") else None
        reading = [t, finite(m.statistic), finite(threshold), m.drifted, finite(p_value)]
        self.readings.append(reading)
        self.latest = {
            "time": t, "statistic": finite(m.statistic), "threshold": finite(threshold),
            "p_value": finite(p_value), "drifted": m.drifted, "detections": m.detections, "events": m.events,
            "reference_size": m.reference_size, "window_size": m.window_size,
            "value": finite(m.value) if m.HasField("value") else None, "source": m.source,
            "reliability": [{"lower": b.lower, "upper": b.upper, "count": b.count,
                             "confidence": finite(b.confidence), "accuracy": finite(b.accuracy)}
                            for b in m.reliability],
            "trend": {"direction": m.trend.direction, "severity": m.trend.severity,
                      "slope": finite(m.trend.slope)} if m.HasField("trend") else None}
        return reading

    def to_dict(self, readings: bool = True) -> dict:
        out = {**self.head, "latest": self.latest}
        if readings:
            out["readings"] = list(self.readings)
        return out


def series_key(m: events_pb2.Signal) -> str:
    labels = series_labels(m.labels)
    return json.dumps([m.model, m.version, m.detector, m.feature, sorted(labels.items())], separators=(",", ":"))


def rollout_dict(m: events_pb2.RolloutState, t: float) -> dict:
    try:
        figures_ = json.loads(m.figures_json) if m.figures_json else None
    except ValueError:
        figures_ = m.figures_json  # shown as it came
    return {"time": t, "model": m.model, "generation": m.generation, "source": m.source,
            "phase": enum_name(events_pb2.RolloutPhase, m.phase, "ROLLOUT_PHASE_"), "strategy": m.strategy,
            "stable_version": m.stable_version, "candidate_version": m.candidate_version,
            "weights": {w.version: finite(w.weight) for w in m.weights}, "shadow_versions": list(m.shadow_versions),
            "step": m.step, "reason": m.reason, "attention": m.attention, "figures": figures_}


def label_key(labels: dict) -> str:
    """An alert's identity across vigil.alerts and Alertmanager's API: its labels, whole."""
    return json.dumps(sorted(labels.items()), separators=(",", ":"))


def alert_dict(m: events_pb2.Alert, t: float) -> dict:
    return {"time": t, "fingerprint": m.fingerprint, "rule": m.rule,
            "state": enum_name(events_pb2.AlertState, m.state, "ALERT_STATE_"),
            "previous_state": enum_name(events_pb2.AlertState, m.previous_state, "ALERT_STATE_"),
            "severity": m.severity, "labels": dict(m.labels), "annotations": dict(m.annotations),
            "starts_at": seconds(m.starts_at), "ends_at": seconds(m.ends_at), "value": finite(m.value),
            "generator_url": m.generator_url, "source": m.source}


class Model:
    def __init__(self, caps: Caps = Caps()):
        self.caps = caps
        self.series: Bounded = Bounded(caps.series)
        self.rollouts: Bounded = Bounded(caps.models)          # model -> deque of decisions, latest last
        self.alerts: Bounded = Bounded(caps.alerts)             # fingerprint -> latest change
        self.alert_changes: deque = deque(maxlen=caps.alert_changes)
        self.traffic: Bounded = Bounded(caps.versions)          # (model, version) -> Traffic
        self.changed_traffic: set = set()                       # versions with events since take_traffic()
        self.records = 0
        self.silenced: dict = {}        # alert labels (label_key) -> ids of the silences that mute it
        self.silences: list = []        # as alerting's API lists them
        self.silences_error: str | None = None

    def apply(self, m, record_time: float) -> dict | None:
        """Take one decoded message; returns the change for the pages, if any (request
        figures go out in batches: `take_traffic`)."""
        self.records += 1
        t = seconds(m.time) or record_time
        if isinstance(m, events_pb2.Signal):
            s = self.series.touch(series_key(m), lambda: Series(series_key(m), m, self.caps))
            reading = s.add(m, t)
            return {"type": "signal", "series": s.to_dict(readings=False), "reading": reading}
        if isinstance(m, events_pb2.Alert):
            a = alert_dict(m, t)
            a["silenced_by"] = self.silenced.get(label_key(a["labels"]), [])
            self.alerts.touch(m.fingerprint, dict).update(a)
            self.alert_changes.append(a)
            return {"type": "alert", "alert": a}
        if isinstance(m, events_pb2.RolloutState):
            decisions = self.rollouts.touch(m.model, lambda: deque(maxlen=self.caps.decisions))
            d = rollout_dict(m, t)
            if decisions and decisions[-1]["generation"] == d["generation"] and d["generation"]:
                decisions[-1] = d  # the same decision read again
            else:
                decisions.append(d)
            return {"type": "rollout", "decision": d}
        if isinstance(m, events_pb2.InferenceEvent) and m.model:
            key = (m.model, m.version)
            self.traffic.touch(key, lambda: Traffic(m.model, m.version, self.caps)).add(
                (t, m.status == events_pb2.STATUS_OK, m.total_seconds, m.first_token_seconds, m.completion_tokens))
            self.changed_traffic.add(key)
        return None

    def set_silences(self, silenced: dict, silences: list, error: str | None) -> list[dict]:
        """What alerting's API says is muted; returns the alerts whose silences changed."""
        self.silenced, self.silences, self.silences_error = silenced, silences, error
        changed = []
        for a in self.alerts.values():
            by = silenced.get(label_key(a["labels"]), [])
            if by != a.get("silenced_by", []):
                a["silenced_by"] = by
                changed.append(a)
        return changed

    def take_traffic(self, now: float | None = None) -> dict | None:
        """The request figures of the versions that had events since the last call, with
        their latest points."""
        now = time.time() if now is None else now
        keys, self.changed_traffic = self.changed_traffic, set()
        versions = [self.traffic[k].to_dict(now, points=3) for k in keys if k in self.traffic]
        return {"type": "traffic", "versions": versions} if versions else None

    def snapshot(self, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        return {
            "time": now, "records": self.records, "signal_columns": SIGNAL_COLUMNS,
            "models": {model: {"latest": d[-1], "history": list(d)} for model, d in self.rollouts.items() if d},
            "traffic": [t.to_dict(now) for t in self.traffic.values()],
            "signals": [s.to_dict() for s in self.series.values()],
            "alerts": list(self.alerts.values()),
            "alert_changes": list(self.alert_changes),
            "silences": self.silences, "silences_error": self.silences_error,
        }

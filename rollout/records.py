"""What the controller takes in (observations: signals and alerts), what it gives out
(decisions), its errors and its clocks. Plain dataclasses; wire.py converts them from and
to protos/events.proto."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

# Phases of a model's rollout. `stable`: no rollout has run yet; `failed`: the candidate
# failed its analysis before it took any traffic (shadow, blue/green before the switch),
# so nothing had to be rolled back.
STABLE, PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK, FAILED = (
    "stable", "progressing", "paused", "promoted", "rolled_back", "failed")
PHASES = (STABLE, PROGRESSING, PAUSED, PROMOTED, ROLLED_BACK, FAILED)
ACTIVE = (PROGRESSING, PAUSED)

CANARY, BLUEGREEN, SHADOW = "canary", "bluegreen", "shadow"
STRATEGIES = (CANARY, BLUEGREEN, SHADOW)


class RolloutError(ValueError):
    """A bad request or configuration; `field` names what was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(slots=True)
class SignalObs:
    """A signal of vigil.signals for one model version (eventbus/signals.py names its
    detector and feature). The controller keeps the candidate-against-stable readings
    (`reference_version` set) and the drift verdicts; it computes no statistic itself."""
    model: str
    version: str
    time: float                      # event time of the latest event the reading covers
    detector: str
    feature: str
    drifted: bool
    statistic: float = 0.0
    kind: str = "drift"              # drift, calibration, quality, latency ("" unknown)
    p_value: float | None = None
    value: float | None = None
    reference_version: str = ""
    reference_size: int = 0
    window_size: int = 0
    events: int = 0                  # the candidate's events (or joined feedbacks) compared so far
    recalibration: dict | None = None  # detector temperature: temperature, ece_before, ece_after,
                                       # accuracy, fitted, held_out


@dataclass(slots=True)
class AlertObs:
    """An alert's state change (from an Alert on vigil.alerts)."""
    fingerprint: str
    rule: str
    state: str  # firing, resolved, pending, inactive
    labels: dict[str, str]
    time: float
    starts_at: float = 0.0  # when it started firing: with the fingerprint, one instance of an alert
    value: float = 0.0


Observation = SignalObs | AlertObs


@dataclass
class Decision:
    """The desired state of one model after a decision: what goes on vigil.rollout.

    `weights` are shares of traffic (0 to 1, summing to 1); a version listed with weight
    0 stays loaded (a candidate under shadow, the old version of a blue/green switch), a
    version not listed may be unloaded. `figures` are the numbers the decision rests on;
    `attention` is true when a person must look (paused after too many inconclusive
    analyses). `state` is the model's whole controller state, so a controller that
    restarts resumes from the last record (Controller.from_records)."""
    model: str
    generation: int
    time: float
    phase: str
    stable: str
    candidate: str
    strategy: str
    step: int
    weights: dict[str, float]
    shadow: list[str]
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    attention: bool = False
    flags: dict[str, dict] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    keep_loaded: list[str] = field(default_factory=list)  # versions at weight 0 the servers must keep
    temperatures: dict[str, float] = field(default_factory=dict)  # version -> temperature (recalibrate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Decision":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class ActionRecord:
    """What the controller did (or would have done, `outcome` "dry-run") about an alert by a
    response policy's rule: an Action on vigil.actions, keyed by `action_id`."""
    action_id: str
    action: str            # fallback, retrain, recalibrate, notify-only
    model: str
    version: str
    policy: str            # the rule's name
    reason: str
    outcome: str           # done, dry-run, skipped, waiting (recalibrate: for a temperature that
                           # helps), pending (retrain: being sent), sent, failed
    alert_fingerprint: str
    alert_name: str
    alert_starts_at: float
    alert_labels: dict[str, str]
    time: float
    target_version: str = ""
    generation: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActionRecord":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """Time moves only when a test says so."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t

"""What the alerting core consumes and produces, as plain dataclasses that map 1:1 onto
the `Signal` and `Alert` messages of protos/events.proto (topics vigil.signals and
vigil.alerts): the service layer converts, the core never sees protobuf or Kafka."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Signal:
    """One detector output, as the stream processors publish it on vigil.signals.

    `threshold` or `p_value` is set depending on the detector (a distance test such as
    PSI or ADWIN has a threshold; KS or chi-square have a p-value); the other is None.
    `reference_size` and `window_size` are the sizes of the two windows compared (0 where
    a detector has no reference window). Times are unix seconds. `kind` is the proto's
    SignalKind in lower case (drift, calibration, quality, latency). `labels` are the
    series labels of eventbus/signals.py (route, reference_version): they become labels
    of the alert, so a canary's drift and the stable version's are separate alerts; any
    other label a signal carries is ignored.
    """

    detector: str
    feature: str
    model: str
    version: str
    statistic: float
    drifted: bool
    time: float
    threshold: float | None = None
    p_value: float | None = None
    reference_size: int = 0
    window_size: int = 0
    kind: str = ""
    window_start: float | None = None
    window_end: float | None = None
    labels: dict[str, str] | None = None
    event_id: str = ""
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Signal":
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})  # type: ignore[attr-defined]


# Alert states (per alert instance: a rule and a label set).
INACTIVE, PENDING, FIRING, RESOLVED = "inactive", "pending", "firing", "resolved"


@dataclass(slots=True)
class Alert:
    """An alert as the notification side sees it: what Alertmanager calls an alert.

    `ends_at` is None while firing; `status` is "firing" or "resolved". A new object is
    made at each state change, so a notification in flight keeps what it was built from.
    """

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    ends_at: float | None
    fingerprint: int
    generator_url: str = ""
    updated_at: float = 0.0

    @property
    def status(self) -> str:
        return RESOLVED if self.ends_at is not None else FIRING

    def resolved_by(self, now: float) -> bool:
        return self.ends_at is not None and self.ends_at <= now

    @property
    def fp_hex(self) -> str:
        return f"{self.fingerprint:016x}"


@dataclass(slots=True)
class StateChange:
    """One record of vigil.alerts (keyed by `fingerprint`): an alert instance moved from
    `previous` to `state` at `at`. `value` is the statistic that decided it."""

    fingerprint: str
    rule: str
    state: str
    previous: str
    at: float
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    active_at: float | None = None
    starts_at: float | None = None
    ends_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if isinstance(self.value, float) and not math.isfinite(self.value):
            d["value"] = str(self.value)
        return d


@dataclass(slots=True)
class Notification:
    """One message for one receiver about one aggregation group."""

    receiver: str
    group_key: str
    group_labels: dict[str, str]
    alerts: list[Alert]
    firing: frozenset[int]
    resolved: frozenset[int]
    created_at: float
    integration: str = ""  # "receiver/webhook/0": the notification log's key for it
    route_id: str = ""
    truncated: int = 0
    repeat_interval: float = 0.0
    send_resolved: bool = True
    resolved_alerts: tuple = ()  # every resolved alert the flush covered (muted ones too)
    not_before: float = 0.0  # a standby instance waits until then, then asks the log again

    @property
    def status(self) -> str:
        return "firing" if self.firing else "resolved"

"""Conversions between the protobuf messages of protos/events.proto and the controller's
records, for the service that runs the controller on Kafka. No Kafka here.

    vigil.inference.events  InferenceEvent -> outcome()      (and FeedbackJoin.remember)
    vigil.feedback          FeedbackEvent  -> FeedbackJoin.join() -> Feedback
    vigil.signals           Signal         -> drift_signal()
    vigil.alerts            Alert          -> alert()
    vigil.rollout           Decision       -> rollout_state();  RolloutState -> decision_dict()

RolloutState carries the controller's state, the figures and the flags as strings of JSON
(EXTRA_FIELDS), so a restarted controller resumes from vigil.rollout alone.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from .records import FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, STABLE, BLUEGREEN, AlertObs, \
    Decision, DriftSignal, Feedback, Outcome

ERROR_STATUSES = ("internal", "deadline_exceeded")  # the version's fault, not the client's
EXTRA_FIELDS = ("controller_state", "figures_json", "attention", "flags_json")  # proposed additions


def _pb():
    from protos import events_pb2
    return events_pb2


def _name(enum, value: int, prefix: str) -> str:
    """An enum value's name, lower case without its prefix; "unspecified" for a value this
    build does not know (a newer writer's), rather than an error."""
    return enum.Name(value).removeprefix(prefix).lower() if value in enum.values() else "unspecified"


def _t(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def outcome(ev) -> Outcome | None:
    """An InferenceEvent as an Outcome; None for a request that never reached a version."""
    pb = _pb()
    if not ev.model or not ev.version:
        return None
    route = _name(pb.Route, ev.route, "ROUTE_")
    error = _name(pb.Status, ev.status, "STATUS_") in ERROR_STATUSES or ev.finish_reason == "error"
    conf = ev.confidence.mean_logprob if ev.HasField("confidence") else None
    return Outcome(ev.model, ev.version, _t(ev.time), error, serving_latency(ev), conf,
                   "" if route == "unspecified" else route)


def serving_latency(ev) -> float:
    """Seconds per output token after the first, or the whole request's time for one token.
    End-to-end time grows with the length of the answer, which the candidate itself
    decides: comparing it would blame a version's speed for what it says."""
    if ev.completion_tokens >= 2 and ev.total_seconds > ev.first_token_seconds > 0:
        return (ev.total_seconds - ev.first_token_seconds) / (ev.completion_tokens - 1)
    return ev.total_seconds


def drift_signal(sig) -> DriftSignal:
    kind = _name(_pb().SignalKind, sig.kind, "SIGNAL_KIND_")
    return DriftSignal(sig.model, sig.version, _t(sig.time), sig.detector, sig.feature, sig.drifted,
                       sig.statistic, "" if kind == "unspecified" else kind)


def alert(a) -> AlertObs:
    state = _name(_pb().AlertState, a.state, "ALERT_STATE_")
    return AlertObs(a.fingerprint, a.rule, state, dict(a.labels), _t(a.time))


class FeedbackJoin:
    """Remembers the label probabilities of recent Classify events by request id, and
    turns a FeedbackEvent naming the true label into Feedback (the probability of the
    predicted label, and whether it was the true one)."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self.pending: OrderedDict[str, tuple[str, str, dict]] = OrderedDict()

    def remember(self, ev) -> None:
        if ev.request_id and ev.label_probabilities and ev.model and ev.version:
            self.pending[ev.request_id] = (ev.model, ev.version, dict(ev.label_probabilities))
            while len(self.pending) > self.capacity:
                self.pending.popitem(last=False)

    def join(self, fb) -> Feedback | None:
        if fb.WhichOneof("truth") != "label" or fb.request_id not in self.pending:
            return None
        model, version, probs = self.pending.pop(fb.request_id)
        predicted = max(probs, key=probs.get)
        return Feedback(model, version, _t(fb.time), probs[predicted], predicted == fb.label)


def _phase(d: Decision) -> int:
    P = _pb().RolloutPhase
    if d.phase == PROGRESSING:
        return P.Value("ROLLOUT_PHASE_BLUE_GREEN" if d.strategy == BLUEGREEN else "ROLLOUT_PHASE_CANARY")
    name = {STABLE: "STABLE", PAUSED: "PAUSED", PROMOTED: "PROMOTED", ROLLED_BACK: "ROLLED_BACK",
            FAILED: "FAILED"}[d.phase]
    return P.Value(f"ROLLOUT_PHASE_{name}") if f"ROLLOUT_PHASE_{name}" in P.keys() \
        else P.Value("ROLLOUT_PHASE_ROLLED_BACK")  # no FAILED in the proto yet


def rollout_state(d: Decision, source: str = "rollout", event_id: str = ""):
    pb = _pb()
    msg = pb.RolloutState(event_id=event_id or f"{d.model}:{d.generation}", source=source, model=d.model,
                          stable_version=d.stable, candidate_version=d.candidate, shadow_versions=d.shadow,
                          phase=_phase(d), strategy=d.strategy, step=d.step, reason=d.reason,
                          generation=d.generation)
    msg.time.FromNanoseconds(int(d.time * 1e9))
    for v, w in d.weights.items():
        msg.weights.add(version=v, weight=w)
    have = msg.DESCRIPTOR.fields_by_name
    if "controller_state" in have:
        msg.controller_state = json.dumps(d.state, separators=(",", ":"))
    if "figures_json" in have:
        msg.figures_json = json.dumps(d.figures, separators=(",", ":"))
    if "attention" in have:
        msg.attention = d.attention
    if "flags_json" in have:
        msg.flags_json = json.dumps(d.flags, separators=(",", ":"))
    return msg


def decision_dict(msg) -> dict:
    """A RolloutState read back, as Controller.from_records takes it ("state" is empty
    unless the proto carries controller_state)."""
    have = msg.DESCRIPTOR.fields_by_name
    state = json.loads(msg.controller_state) if "controller_state" in have and msg.controller_state else {}
    return {"model": msg.model, "generation": msg.generation, "time": _t(msg.time), "stable": msg.stable_version,
            "candidate": msg.candidate_version, "weights": {w.version: w.weight for w in msg.weights},
            "shadow": list(msg.shadow_versions), "strategy": msg.strategy, "step": msg.step,
            "reason": msg.reason, "state": state,
            "phase": _name(_pb().RolloutPhase, msg.phase, "ROLLOUT_PHASE_"),
            "figures": json.loads(msg.figures_json) if "figures_json" in have and msg.figures_json else {},
            "attention": bool(getattr(msg, "attention", False)),
            "flags": json.loads(msg.flags_json) if "flags_json" in have and msg.flags_json else {},
            "source": msg.source}

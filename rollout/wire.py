"""Conversions between the protobuf messages of protos/events.proto and the controller's
records, for the service that runs the controller on Kafka. No Kafka here.

    vigil.signals           Signal         -> signal()
    vigil.alerts            Alert          -> alert()
    vigil.rollout           Decision       -> rollout_state();  RolloutState -> decision_dict()
    vigil.actions           ActionRecord   -> action();         Action -> action_record()

RolloutState carries the controller's state, the figures and the flags as strings of JSON
(EXTRA_FIELDS), so a restarted controller resumes from vigil.rollout alone.
"""

from __future__ import annotations

import json

from .records import FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, STABLE, BLUEGREEN, ActionRecord, \
    AlertObs, Decision, SignalObs

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


def signal(sig) -> SignalObs:
    kind = _name(_pb().SignalKind, sig.kind, "SIGNAL_KIND_")
    recal = None
    if sig.HasField("recalibration"):
        r = sig.recalibration
        recal = {"temperature": r.temperature, "ece_before": r.ece_before, "ece_after": r.ece_after,
                 "accuracy": r.accuracy, "fitted": r.fitted, "held_out": r.held_out}
    return SignalObs(sig.model, sig.version, _t(sig.window_end) if sig.HasField("window_end") else _t(sig.time),
                     sig.detector, sig.feature, sig.drifted, sig.statistic, "" if kind == "unspecified" else kind,
                     sig.p_value if sig.HasField("p_value") else None, sig.value if sig.HasField("value") else None,
                     sig.labels.get("reference_version", ""), sig.reference_size, sig.window_size, sig.events,
                     recal)


def alert(a) -> AlertObs:
    state = _name(_pb().AlertState, a.state, "ALERT_STATE_")
    labels = dict(a.labels)
    if a.severity:
        labels.setdefault("severity", a.severity)
    return AlertObs(a.fingerprint, a.rule, state, labels, _t(a.time),
                    _t(a.starts_at) if a.HasField("starts_at") else 0.0, a.value)


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
    if "keep_loaded" in have:
        msg.keep_loaded.extend(d.keep_loaded)
        msg.temperatures.update(d.temperatures)
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
            "keep_loaded": list(getattr(msg, "keep_loaded", [])), "temperatures": dict(getattr(msg, "temperatures", {})),
            "source": msg.source}


def action(a: ActionRecord, source: str = "rollout"):
    """An Action for vigil.actions; `event_id` names the action and its outcome, so the
    final record of a retrain (sent or failed) is a record of its own."""
    pb = _pb()
    msg = pb.Action(event_id=f"{a.action_id}:{a.outcome}", source=source, action_id=a.action_id, action=a.action,
                    model=a.model, version=a.version, target_version=a.target_version, policy=a.policy,
                    reason=a.reason, outcome=a.outcome, alert_fingerprint=a.alert_fingerprint,
                    alert_name=a.alert_name, generation=a.generation,
                    details_json=json.dumps(a.details, separators=(",", ":"), default=str))
    msg.time.FromNanoseconds(int(a.time * 1e9))
    if a.alert_starts_at:
        msg.alert_starts_at.FromNanoseconds(int(a.alert_starts_at * 1e9))
    msg.alert_labels.update(a.alert_labels)
    return msg


def action_record(msg) -> ActionRecord:
    try:
        details = json.loads(msg.details_json) if msg.details_json else {}
    except ValueError:
        details = {"details_json": msg.details_json}
    return ActionRecord(msg.action_id, msg.action, msg.model, msg.version, msg.policy, msg.reason, msg.outcome,
                        msg.alert_fingerprint, msg.alert_name,
                        _t(msg.alert_starts_at) if msg.HasField("alert_starts_at") else 0.0,
                        dict(msg.alert_labels), _t(msg.time), msg.target_version, msg.generation,
                        details if isinstance(details, dict) else {})

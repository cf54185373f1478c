"""One record of each kind the services write (Signal, Alert, RolloutState,
InferenceEvent), stamped as a producer would, and producing them to their topics."""

from __future__ import annotations

import json
import time
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from console.reader import TOPICS
from eventbus import cloudevents, codec, topics
from protos import events_pb2


def stamp(m, t: float | None = None):
    m.event_id = str(uuid.uuid4())
    m.source = "test"
    m.time.FromNanoseconds(int((time.time() if t is None else t) * 1e9))
    return m


def drift(model: str, version: str, feature: str = "mean_logprob", statistic: float = 0.4, drifted: bool = True,
          detector: str = "ks", t: float | None = None, **fields) -> events_pb2.Signal:
    return stamp(events_pb2.Signal(model=model, version=version, kind=events_pb2.SIGNAL_KIND_DRIFT, detector=detector,
                                   feature=feature, statistic=statistic, threshold=0.2, p_value=0.001 if drifted else 0.5,
                                   drifted=drifted, detections=1 if drifted else 0, events=400,
                                   labels={"route": "stable"}, **fields), t)


def ece(model: str, version: str, statistic: float) -> events_pb2.Signal:
    bins = [events_pb2.ReliabilityBin(lower=i / 4, upper=(i + 1) / 4, count=10 + i, confidence=i / 4 + 0.1,
                                      accuracy=i / 4) for i in range(4)]
    return stamp(events_pb2.Signal(model=model, version=version, kind=events_pb2.SIGNAL_KIND_CALIBRATION,
                                   detector="ece", feature="label", statistic=statistic, threshold=0.1,
                                   drifted=statistic > 0.1, reliability=bins))


def alert(model: str, version: str, state: int, label: str = "ok") -> events_pb2.Alert:
    return stamp(events_pb2.Alert(
        fingerprint=f"fp-{model}", rule="MeanLogprobDrift", state=state, previous_state=events_pb2.ALERT_STATE_PENDING,
        severity="warning", labels={"alertname": "MeanLogprobDrift", "model": model, "version": version,
                                    "detector": "ks", "feature": "mean_logprob", "team": label},
        annotations={"summary": f"mean_logprob of {model}/{version} drifted", "runbook": "<b>bold</b>"}, value=0.4))


def rollout(model: str, generation: int, phase: int, weights: dict, reason: str, step: int = 0) -> events_pb2.RolloutState:
    return stamp(events_pb2.RolloutState(
        model=model, stable_version="1", candidate_version="2" if len(weights) > 1 else "", phase=phase,
        strategy="canary", step=step, reason=reason, generation=generation,
        weights=[events_pb2.VersionWeight(version=v, weight=w) for v, w in weights.items()],
        figures_json=json.dumps({"errors": {"candidate": 0.0}})))


def request(model: str, version: str, total: float, ok: bool = True, tokens: int = 10,
            t: float | None = None) -> events_pb2.InferenceEvent:
    return stamp(events_pb2.InferenceEvent(
        request_id=str(uuid.uuid4()), method="Generate", model=model, version=version,
        status=events_pb2.STATUS_OK if ok else events_pb2.STATUS_INTERNAL, total_seconds=total,
        first_token_seconds=total / 10, completion_tokens=tokens if ok else 0), t)


def key_of(m) -> str:
    if isinstance(m, events_pb2.Signal):
        return topics.model_key(m.model, m.version)
    return m.fingerprint if isinstance(m, events_pb2.Alert) else m.model


TOPIC_OF = {events_pb2.Signal: topics.SIGNALS, events_pb2.Alert: topics.ALERTS,
            events_pb2.RolloutState: topics.ROLLOUT, events_pb2.InferenceEvent: topics.INFERENCE}


async def produce(bootstrap: str, *messages) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for m in messages:
            await p.send_and_wait(TOPIC_OF[type(m)], codec.encode(m), key=key_of(m).encode(),
                                  headers=cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "test",
                                                              time.time(), codec.PROTOBUF))
    finally:
        await p.stop()


async def ensure_topics(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await topics.ensure_topics(admin, TOPICS, topics.TopicOptions(partitions=3))  # as test_events makes them on the shared broker
    finally:
        await admin.close()

"""The response policy in the `vigil rollout` service, on the embedded broker: an alert on
the promoted version (an Alert written onto vigil.alerts, as alerting writes it) falls back
to the last healthy version; the action is on vigil.actions, counted, shown by `vigil
rollout history`, and never taken twice (the alert redelivered, the controller restarted);
a bad policy on reload keeps the last good one; a retrain is a signed webhook whose
manifest's offset ranges, read with confluent-kafka, hold exactly the drifted events."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from eventbus import topics
from eventbus.broker import EmbeddedBroker
from eventbus.kafka import Kafka
from eventbus.signing import SIGNATURE_HEADER, verify
from protos import events_pb2
from tests.helpers.kafka import read_topic
from tests.helpers.rollout import ServiceThread
from tests.helpers.waiting import wait_until

POLICY = """
rules:
  - name: fallback-critical
    matchers: ['severity="critical"', 'category=~"quality|drift"']
    action: fallback
  - name: note
    matchers: ['alertname="Note"']
    action: notify-only
    cooldown: 0s
    limit: 100
"""


def alert_message(model, version, rule="FeedbackScoreShift", fp=None, starts_at=None, severity="critical",
                  category="quality"):
    a = events_pb2.Alert(event_id=str(uuid.uuid4()), source="test", fingerprint=fp or uuid.uuid4().hex[:16],
                         rule=rule, state=events_pb2.ALERT_STATE_FIRING, severity=severity,
                         labels={"alertname": rule, "model": model, "version": version, "severity": severity,
                                 "category": category})
    a.time.GetCurrentTime()
    a.starts_at.FromNanoseconds(int((starts_at or time.time()) * 1e9))
    return a


class Alerts:
    def __init__(self, bootstrap):
        self.producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3})

    def send(self, a, partition=0):
        self.producer.produce(topics.ALERTS, value=a.SerializeToString(), key=a.fingerprint, partition=partition)
        self.producer.flush(10)


def actions_of(bootstrap, model, count):
    def mine(r):
        a = events_pb2.Action.FromString(r.value())
        return a.model == model
    return [events_pb2.Action.FromString(r.value()) for r in read_topic(bootstrap, topics.ACTIONS, mine, count, 15)]


def promoted(ctl, model):
    ctl.api.call("start", model=model, stable="1", candidate="2", steps=[100], watch=600)
    d = ctl.api.call("promote", model=model)
    assert d["phase"] == "promoted" and d["keep_loaded"] == ["1"]


def test_an_alert_on_the_promoted_version_falls_back_once_whatever_is_redelivered_or_restarted(
        kafka_broker, tmp_path, capsys):
    bootstrap = kafka_broker.bootstrap_servers
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    model, group = f"fb-{uuid.uuid4().hex[:6]}", f"g-{uuid.uuid4().hex[:6]}"
    ctl = ServiceThread(bootstrap, group, tmp_path, "a", policy=str(policy))
    try:
        wait_until(lambda: ctl.service.leader, 20, "the lease")
        promoted(ctl, model)
        bad = alert_message(model, "2")
        alerts = Alerts(bootstrap)
        sent = time.monotonic()
        alerts.send(bad)
        s = wait_until(lambda: (st := ctl.api.call("status", model=model))["phase"] == "rolled_back" and st, 20,
                       "the fallback")
        print(f"alert to fallback in the service: {time.monotonic() - sent:.2f}s")
        assert s["stable"] == "1" and s["weights"] == {"1": 1.0}
        assert "FeedbackScoreShift" in s["reason"] and "from 2 to 1" in s["reason"], s["reason"]
        # redelivered: nothing more; a notify-only alert after it on the same partition shows it was read
        alerts.send(bad)
        alerts.send(alert_message(model, "2", rule="Note", severity="info", category="x"))
        acts = actions_of(bootstrap, model, 2)
        assert sorted((a.action, a.outcome) for a in acts) == [("fallback", "done"), ("notify-only", "done")]
        [fb] = [a for a in acts if a.action == "fallback"]
        assert fb.target_version == "1" and fb.alert_fingerprint == bad.fingerprint and fb.generation > 0
        text = ctl.service.metrics.registry.get_sample_value(
            "vigil_rollout_actions_total", {"action": "fallback", "outcome": "done"})
        assert text == 1.0
        from vigil.cli import main as vigil
        assert vigil(["rollout", "history", model, "--url", ctl.api.url]) == 0
        out = capsys.readouterr().out
        assert "fallback    done     2 -> 1  [fallback-critical]" in out, out
        # a bad policy on reload keeps the good one
        policy.write_text("rules:\n  - name: x\n    action: explode\n")
        assert ctl.service.reload_policy() is False and len(ctl.service.policy) == 2
        policy.write_text(POLICY)
        assert ctl.service.reload_policy() is True
    finally:
        ctl.stop()
    # a restarted controller reads vigil.actions back: the redelivered alert does nothing
    again = ServiceThread(bootstrap, group, tmp_path, "b", policy=str(policy))
    try:
        wait_until(lambda: again.service.leader, 20, "the lease after the restart")
        alerts.send(bad)
        alerts.send(alert_message(model, "2", rule="Note", severity="info", category="x"))
        acts = actions_of(bootstrap, model, 3)
        assert sorted(a.action for a in acts) == ["fallback", "notify-only", "notify-only"]
        assert again.api.call("status", model=model)["stable"] == "1"
    finally:
        again.stop()


class Hook(BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Hook.got.append((body, dict(self.headers)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *a):
        pass


@pytest.fixture
def own_broker():
    """A broker of the test's own: the manifest's start is found by the records' timestamps,
    which grow within a partition where servers write in real time; on the shared broker,
    other tests' records of now come before this test's records of minutes ago."""
    with EmbeddedBroker() as broker:
        asyncio.run(Kafka(broker.bootstrap_servers).ensure_topics("vigil-tests", topics.ALL,
                                                                   topics.TopicOptions(partitions=3)))
        yield broker


def test_retrain_sends_a_signed_manifest_whose_ranges_hold_exactly_the_drifted_events(own_broker, tmp_path):
    bootstrap = own_broker.bootstrap_servers
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.got = []
    policy = tmp_path / "policy.yml"
    (tmp_path / "secret").write_text("s3cret\n")
    policy.write_text(f"""
rules:
  - name: retrain-on-drift
    matchers: ['alertname="ConceptDrift"']
    action: retrain
    url: http://127.0.0.1:{server.server_port}/train
    hmac_secret_file: secret
""")
    model = f"rt-{uuid.uuid4().hex[:6]}"
    producer = Producer({"bootstrap.servers": bootstrap, "log_level": 3, "partitioner": "murmur2_random"})
    now_ms = int(time.time() * 1000)
    drift_ms = now_ms - 60_000
    baseline, drifted = set(), set()

    def produce(request_id, ts_ms, feedback):
        if feedback:
            ev = events_pb2.FeedbackEvent(event_id=str(uuid.uuid4()), request_id=request_id, model=model, version="1",
                                          score=0.1)
            topic = topics.FEEDBACK
        else:
            ev = events_pb2.InferenceEvent(event_id=str(uuid.uuid4()), request_id=request_id, model=model,
                                           version="1")
            topic = topics.INFERENCE
        producer.produce(topic, value=ev.SerializeToString(), key=topics.event_key(model), timestamp=ts_ms)

    for i in range(30):
        produce(f"base-{i}", drift_ms - 120_000 + i * 100, False)
        produce(f"base-{i}", drift_ms - 120_000 + i * 100 + 50, True)
        baseline.add(f"base-{i}")
    producer.flush(10)
    for i in range(20):
        produce(f"drift-{i}", drift_ms + i * 100, False)
        produce(f"drift-{i}", drift_ms + i * 100 + 50, True)
        drifted.add(f"drift-{i}")
    producer.flush(10)

    ctl = ServiceThread(bootstrap, f"g-{model}", tmp_path, "r", policy=str(policy))
    try:
        wait_until(lambda: ctl.service.leader, 20, "the lease")
        ctl.api.call("register", model=model, versions=["1"], stable="1")
        Alerts(bootstrap).send(alert_message(model, "1", rule="ConceptDrift", starts_at=drift_ms / 1000,
                                             category="drift"))
        wait_until(lambda: Hook.got, 20, "the retrain request")
        body, headers = Hook.got[0]
        assert verify(b"s3cret", body, headers.get(SIGNATURE_HEADER))
        manifest = json.loads(body)
        assert manifest["model"] == model and manifest["version"] == "1"
        assert manifest["alerts"][0]["alertname"] == "ConceptDrift"
        ranges = {d["topic"]: d["partitions"] for d in manifest["data"]}
        assert set(ranges) == {topics.INFERENCE, topics.FEEDBACK}
        for topic, message in ((topics.INFERENCE, events_pb2.InferenceEvent), (topics.FEEDBACK, events_pb2.FeedbackEvent)):
            found = read_ranges(bootstrap, topic, ranges[topic], message, model)
            assert sorted(found) == sorted(drifted), (topic, sorted(found))
        [done] = [a for a in actions_of(bootstrap, model, 2) if a.outcome != "pending"]
        assert done.outcome == "sent" and json.loads(done.details_json)["manifest"]["action_id"] == done.action_id
    finally:
        ctl.stop()
        server.shutdown()


def read_ranges(bootstrap, topic, partitions, message, model) -> list[str]:
    """The request ids of `model` in [start_offset, end_offset) of each partition, read with
    confluent-kafka (a consumer nobody here wrote)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4()}", "enable.auto.commit": False,
                  "log_level": 3, "session.timeout.ms": 6000, "max.poll.interval.ms": 6000})
    out = []
    try:
        for p in partitions:
            if p["end_offset"] <= p["start_offset"]:
                continue
            c.assign([TopicPartition(topic, p["partition"], p["start_offset"])])
            deadline = time.monotonic() + 15
            offset = p["start_offset"]
            while offset < p["end_offset"]:
                assert time.monotonic() < deadline, f"{topic}/{p['partition']} not read to {p['end_offset']}"
                r = c.poll(0.2)
                if r is None or r.error():
                    continue
                offset = r.offset() + 1
                if r.offset() >= p["end_offset"]:
                    break
                ev = message.FromString(r.value())
                if ev.model == model:
                    out.append(ev.request_id)
    finally:
        c.close()
    return out

"""A fallback reaches the servers: an inference server with versions 1 and 2 of the tiny
model follows vigil.rollout; after 2 is promoted, 1 stays loaded (listed in keep_loaded),
and an alert on 2 (written onto vigil.alerts as alerting writes it) moves all of the
server's traffic back to 1."""

from __future__ import annotations

import time
import uuid

import grpc
from confluent_kafka import Producer

from eventbus import topics
from inference.api.options import EventOptions
from protos import events_pb2, llm_pb2, llm_pb2_grpc
from tests.helpers.rollout import ServiceThread
from tests.helpers.waiting import wait_until

POLICY = """
rules:
  - name: fallback-on-critical
    matchers: ['severity="critical"']
    action: fallback
"""


def test_the_server_follows_a_fallback_to_the_version_it_kept_loaded(start_server, tiny_llama, tmp_path,
                                                                      kafka_broker):
    bootstrap = kafka_broker.bootstrap_servers
    model = f"fbs-{uuid.uuid4().hex[:6]}"
    s = start_server(model=str(tiny_llama), model_name=model, version="1", quantize="none",
                     events=EventOptions(bootstrap_servers=bootstrap, publish_timeout_ms=1000, topic_partitions=3,
                                         outbox_dir=str(tmp_path / "outbox-server")))
    s.call(s.server.versions.load(model, "2", str(tiny_llama), "none"))
    (tmp_path / "policy.yml").write_text(POLICY)
    ctl = ServiceThread(bootstrap, f"g-{model}", tmp_path, "ctl", policy=str(tmp_path / "policy.yml"))
    weights = lambda: dict(s.server.router.weights.get(model, {}))  # noqa: E731
    try:
        wait_until(lambda: ctl.service.leader, 20, "the lease")
        ctl.api.call("start", model=model, stable="1", candidate="2", steps=[100])
        ctl.api.call("promote", model=model)
        wait_until(lambda: weights() == {"1": 0.0, "2": 1.0}, 10, "the server to follow the promotion")
        a = events_pb2.Alert(event_id=str(uuid.uuid4()), fingerprint=uuid.uuid4().hex[:16], rule="HighErrorRate",
                             state=events_pb2.ALERT_STATE_FIRING, severity="critical",
                             labels={"alertname": "HighErrorRate", "model": model, "version": "2",
                                     "severity": "critical", "category": "errors"})
        a.time.GetCurrentTime()
        a.starts_at.GetCurrentTime()
        p = Producer({"bootstrap.servers": bootstrap, "log_level": 3})
        p.produce(topics.ALERTS, value=a.SerializeToString(), key=a.fingerprint)
        p.flush(10)
        sent = time.monotonic()
        wait_until(lambda: weights() == {"1": 1.0, "2": 0.0}, 20, "the server to follow the fallback")
        print(f"\nalert written to the server serving version 1 again: {time.monotonic() - sent:.2f}s")
        with grpc.insecure_channel(s.address) as ch:
            r = llm_pb2_grpc.LLMStub(ch).Generate(llm_pb2.GenerateRequest(
                model=model, prompt="hello", sampling=llm_pb2.SamplingParams(max_tokens=2, temperature=0)),
                timeout=30)
        assert r.version == "1"
        st = ctl.api.call("status", model=model)
        assert st["phase"] == "rolled_back" and "HighErrorRate" in st["reason"], st["reason"]
    finally:
        ctl.stop()

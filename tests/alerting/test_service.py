"""`vigil alerting` on a real broker (Tansu, embedded) with a real webhook receiver:
Signal records on vigil.signals give a firing alert, one signed Alertmanager v4 webhook and
Alert records on vigil.alerts; a restarted instance neither re-sends nor forgets; an HA
pair sends each notification once; check-rules and a service given bad rules fail as
processes, naming file, line and field."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from alerting.service import AlertingService, ServiceOptions, signal_from_proto
from eventbus import cloudevents, codec, topics
from protos import events_pb2
from tests.helpers.waiting import until
from tests.helpers.webhooks import ALERT_V4_FIELDS, WEBHOOK_V4_FIELDS, WebhookRecorder
from tests.helpers import ROOT

on_session_loop = pytest.mark.asyncio(loop_scope="session")  # as the fixtures

SECRET = b"service-secret"

RULES = """
groups:
  - name: drift
    rules:
      - alert: FeatureDrift
        signal: {detector: ks, drifted: true}
        for: 200ms
        labels: {severity: warning}
        annotations:
          summary: "{{ $labels.feature }} of {{ $labels.model }} drifted (p={{ $value }})"
"""

CONFIG = """
global:
  external_url: http://vigil.test:9095
route:
  receiver: hook
  group_by: [alertname, model]
  group_wait: 100ms
  group_interval: 500ms
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: "{url}"
        max_attempts: 3
        backoff: 10ms
"""


@pytest.fixture
async def recorder():
    r = await WebhookRecorder(secret=SECRET).start()
    yield r
    await r.stop()


@pytest.fixture
def files(tmp_path, recorder):
    (tmp_path / "rules.yml").write_text(RULES)
    (tmp_path / "config.yml").write_text(CONFIG.format(url=recorder.url))  # no hmac_secret: from the file
    (tmp_path / "secret").write_bytes(SECRET + b"\n")
    return tmp_path


def options(kafka_broker, files, instance: str, **kw) -> ServiceOptions:
    return ServiceOptions(bootstrap_servers=kafka_broker.bootstrap_servers, rule_files=[str(files / "rules.yml")],
                          config_file=str(files / "config.yml"), admin_port=0, instance=instance,
                          webhook_secret_file=str(files / "secret"), snapshot_interval=1.0, **kw)


async def start(opts: ServiceOptions) -> AlertingService:
    s = AlertingService(opts)
    await s.start()
    return s


def signal(model: str, feature: str = "latency", drifted: bool = True) -> events_pb2.Signal:
    m = events_pb2.Signal(event_id=str(uuid.uuid4()), source="test", model=model, version="v1",
                          kind=events_pb2.SIGNAL_KIND_DRIFT, detector="ks", feature=feature,
                          statistic=0.4 if drifted else 0.05, p_value=0.001 if drifted else 0.6, drifted=drifted,
                          reference_size=500, window_size=200, labels={"route": "stable"})
    m.time.GetCurrentTime()
    return m


async def produce(bootstrap: str, *msgs: events_pb2.Signal) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await p.start()
    try:
        for m in msgs:
            await p.send_and_wait(topics.SIGNALS, codec.encode(m), key=topics.model_key(m.model, m.version).encode(),
                                  headers=cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "test",
                                                              time.time(), codec.PROTOBUF))
    finally:
        await p.stop()


async def alerts_of(bootstrap: str, model: str, want: int, timeout: float = 10.0) -> list:
    """(key, Alert) records of vigil.alerts about `model`, from the beginning, once `want` came."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        while not c.partitions_for_topic(topics.ALERTS):
            await c.topics()
        tps = [TopicPartition(topics.ALERTS, p) for p in sorted(c.partitions_for_topic(topics.ALERTS))]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        found, deadline = [], time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            for records in (await c.getmany(timeout_ms=200)).values():
                for r in records:
                    a = codec.decode(r.value, cloudevents.attributes(r.headers), r.topic)
                    if a.labels.get("model") == model:
                        found.append((r.key.decode(), a))
        return found
    finally:
        await c.stop()


async def signals_until_notified(bootstrap: str, recorder, count: int, *signals) -> list:
    """The same signals again until the webhook has `count` notifications: a rule's `for`
    passes while its signal keeps coming."""
    async def notified():
        await produce(bootstrap, *signals)
        return len(recorder.received) >= count and recorder.received
    return await until(notified, 10, f"notification {count}", every=0.2)


def test_signal_proto_maps_onto_the_core_signal():
    m = signal("m")
    s = signal_from_proto(m)
    assert (s.detector, s.feature, s.model, s.version, s.kind, s.drifted) == ("ks", "latency", "m", "v1", "drift", True)
    assert s.p_value == pytest.approx(0.001) and s.threshold is None and s.labels == {"route": "stable"}
    assert abs(s.time - time.time()) < 5 and s.window_start is None


@on_session_loop
async def test_signals_to_signed_webhook_and_alerts_then_restart_neither_resends_nor_forgets(
        kafka_broker, files, recorder):
    bootstrap = kafka_broker.bootstrap_servers
    model = f"svc-{uuid.uuid4().hex[:6]}"
    instance = f"t-{model}"
    a = await start(options(kafka_broker, files, instance))
    snapshots, persist = [], a._persist_snapshot

    def persist_and_keep():
        persist()
        snapshots.append(a.core.snapshot())
    a._persist_snapshot = persist_and_keep
    try:
        assert not a.restored
        got = await signals_until_notified(bootstrap, recorder, 1, signal(model), signal(model, "mean_logprob"))
        body = got[0].json
        assert got[0].signature_ok is True
        assert set(WEBHOOK_V4_FIELDS) <= set(body) and body["version"] == "4" and body["status"] == "firing"
        assert all(set(ALERT_V4_FIELDS) <= set(x) for x in body["alerts"])
        assert {x["labels"]["feature"] for x in body["alerts"]} == {"latency", "mean_logprob"}
        records = await alerts_of(bootstrap, model, 4)
        by_fp = {}
        for key, alert in records:
            assert key == alert.fingerprint
            by_fp.setdefault(key, []).append(alert.state)
        assert len(by_fp) == 2
        assert all(s[:2] == [events_pb2.ALERT_STATE_PENDING, events_pb2.ALERT_STATE_FIRING] for s in by_fp.values())
        assert records[0][1].severity == "warning" and records[0][1].starts_at.seconds > 0
        await until(lambda: snapshots and snapshots[-1]["nflog"], 10, "a snapshot with the notification logged")
        a._persist_snapshot = lambda: None  # die without a last snapshot, as a crash would
    finally:
        await a.stop()

    b = await start(options(kafka_broker, files, instance))
    try:
        assert b.restored
        assert sorted(i.state for i in b.core.engine.instances.values()
                      if i.labels.get("model") == model) == ["firing", "firing"]
        taken = b.core.metric("vigil_alerting_signals_total")
        await produce(bootstrap, signal(model), signal(model, "mean_logprob"))
        await until(lambda: b.core.metric("vigil_alerting_signals_total") >= taken + 2, 10, "the signals taken in")
        assert b.core.dispatcher.groups and b.core.dispatcher.flush_now() == []  # the restored log says sent
        await b.core.drain()
        assert len(recorder.received) == 1, "a restarted instance sent again"
        await produce(bootstrap, signal(model, drifted=False), signal(model, "mean_logprob", drifted=False))
        got = await recorder.wait_for(2, timeout=10)
        assert got[1].json["status"] == "resolved" and got[1].signature_ok is True
        records = await alerts_of(bootstrap, model, 6)
        assert sum(a.state == events_pb2.ALERT_STATE_RESOLVED for _, a in records) == 2
    finally:
        await b.stop()


@on_session_loop
async def test_two_instances_send_each_notification_once(kafka_broker, files, recorder):
    bootstrap = kafka_broker.bootstrap_servers
    model = f"ha-{uuid.uuid4().hex[:6]}"
    primary = await start(options(kafka_broker, files, f"{model}-0", peer_position=0, peer_timeout=3.0))
    standby = await start(options(kafka_broker, files, f"{model}-1", peer_position=1, peer_timeout=3.0))
    try:
        def standby_log(firing: bool) -> bool:
            """The standby's log holds its peer's entry for the group: firing, or all resolved."""
            entries = [e for e in standby.core.nflog.entries.values() if model in e.group_key]
            return bool(entries) and all(bool(e.firing) == firing and bool(e.resolved) != firing for e in entries)

        await signals_until_notified(bootstrap, recorder, 1, signal(model))
        await until(lambda: standby_log(firing=True), 30, "the peer's notification in the standby's log")
        await standby.core.drain()
        assert len(recorder.received) == 1
        assert standby.merged_from_peers >= 1
        await produce(bootstrap, signal(model, drifted=False))
        await recorder.wait_for(2, timeout=10)
        await until(lambda: standby_log(firing=False), 30, "the peer's resolved notification in the standby's log")
        await standby.core.drain()
        assert [r.json["status"] for r in recorder.received] == ["firing", "resolved"]
        # the primary goes away: the standby alone notifies, after its wait
        await primary.stop()
        await signals_until_notified(bootstrap, recorder, 3, signal(model, "mean_entropy"))
        assert recorder.received[2].json["alerts"][0]["labels"]["feature"] == "mean_entropy"
    finally:
        await standby.stop()
        if primary.tasks:
            await primary.stop()


def test_check_rules_and_the_service_refuse_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: g\n    rules:\n      - alert: A\n        signal: {detector: kss}\n"
                   "        for: 5 minutes\n")
    out = subprocess.run([sys.executable, "-m", "vigil.cli", "alerting", "check-rules", str(bad)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert f"{bad}:5:" in out.stderr and "detector" in out.stderr
    assert f"{bad}:6:" in out.stderr and "for" in out.stderr
    good = subprocess.run([sys.executable, "-m", "vigil.cli", "alerting", "check-rules", "alerting/default_rules.yml"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    svc = subprocess.run([sys.executable, "-m", "vigil.cli", "alerting", "--rules", str(bad),
                          "--bootstrap-servers", "127.0.0.1:1", "--admin-port", "0"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert svc.returncode == 1 and f"{bad}:5:" in svc.stderr and "refusing to start" in svc.stderr


async def http_get(url: str) -> tuple[int, str]:
    import aiohttp
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


@pytest.mark.asyncio(loop_scope="session")
async def test_alerting_signals_task_failing_is_shown_and_reads_its_batch_again(kafka_broker, files, recorder,
                                                                                caplog):
    """The fault is injected where the signals task hands a batch to the core
    (AlertingCore.ingest_many): it raises until the test has seen the task down."""
    import uuid

    from alerting.service import AlertingService

    model = f"sup-{uuid.uuid4().hex[:6]}"
    service = AlertingService(options(kafka_broker, files, f"t-{model}"))
    await service.start()
    try:
        registry = service.core.registry

        async def ready(want: int):
            status, text = await http_get(f"{service.admin.url}/-/ready")
            return status == want and text

        assert await ready(200)
        ingest, broken = service.core.ingest_many, asyncio.Event()

        def faulty(sigs):
            if broken.is_set():
                raise RuntimeError("injected ingest fault")
            return ingest(sigs)

        service.core.ingest_many = faulty
        taken = lambda: registry.get_sample_value("vigil_alerting_signals_total") or 0  # noqa: E731
        before = taken()
        with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
            broken.set()
            await produce(kafka_broker.bootstrap_servers, signal(model))
            assert "alerting-signals down" in await until(lambda: ready(503), 30, "not ready")
            assert registry.get_sample_value("vigil_task_failures_total", {"task": "alerting-signals"}) >= 1
            broken.clear()
            await until(lambda: ready(200), 60, "ready again")
        assert "task alerting-signals failed" in caplog.text and "injected ingest fault" in caplog.text
        await until(lambda: taken() > before, 30, "the failed batch taken in after the restart")

        async def fired():  # the rule's `for` passes while signals keep coming
            await produce(kafka_broker.bootstrap_servers, signal(model))
            return recorder.received
        await until(fired, 30, "the alert's webhook", every=0.2)
    finally:
        await service.stop()

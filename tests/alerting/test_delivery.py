"""The alerting core over real HTTP on loopback: signed v4 webhooks, retries and counted
failures, per-receiver queues, silences from the CLI through the admin API, reload, and
an HA pair that sends each notification once."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from alerting.admin import AdminServer
from alerting.cli import silences_main
from alerting.config import config_from_text
from alerting.core import AlertingCore
from alerting.labels import fingerprint_hex
from alerting.rules import rules_from_text
from eventbus.signing import SIGNATURE_HEADER, sign
from eventbus.service import listen
from tests.helpers.waiting import until
from tests.helpers.webhooks import ALERT_V4_FIELDS, WEBHOOK_V4_FIELDS, WebhookRecorder, drift_signal

# the fixtures live on the session's loop (pyproject sets that scope for fixtures); so do the tests
pytestmark = pytest.mark.asyncio(loop_scope="session")

SECRET = b"s3cret"

RULES = """
groups:
  - name: drift
    rules:
      - alert: FeatureDrift
        signal: {detector: ks, drifted: true}
        labels: {severity: warning}
        annotations:
          summary: "{{ $labels.feature }} of {{ $labels.model }} drifted"
          value: "{{ $value }}"
"""


def config(*hooks: tuple[str, str], extra: str = "", gw="50ms", gi="300ms", attempts=3, timeout="2s") -> str:
    routes = "".join(f"""
    - matchers: ['model="{model}"']
      receiver: {model}""" for model, _ in hooks[1:])
    recvs = "".join(f"""
  - name: {model}
    webhook_configs:
      - url: "{url}"
        hmac_secret: "{SECRET.decode()}"
        max_attempts: {attempts}
        backoff: 10ms
        max_backoff: 40ms
        timeout: {timeout}""" for model, url in hooks)
    return f"""
global:
  external_url: http://vigil.test:9095
route:
  receiver: {hooks[0][0]}
  group_by: [alertname, model]
  group_wait: {gw}
  group_interval: {gi}
  repeat_interval: 1h
  routes:{routes or " []"}
receivers:{recvs}
{extra}"""


@pytest.fixture
async def recorder():
    r = await WebhookRecorder(secret=SECRET).start()
    yield r
    await r.stop()


async def make_core(cfg: str, rules: str = RULES, **kw) -> AlertingCore:
    core = AlertingCore(rules_from_text(rules), config_from_text(cfg), **kw)
    await core.start()
    return core


async def test_webhook_is_alertmanager_v4_and_signed(recorder):
    core = await make_core(config(("m1", recorder.url)))
    try:
        core.ingest(drift_signal(model="m1", feature="latency"))
        core.ingest(drift_signal(model="m1", feature="ttft"))
        [got] = await recorder.wait_for(1)
        assert got.signature_ok is True
        assert got.headers[SIGNATURE_HEADER] == sign(SECRET, got.body)
        assert got.headers["Content-Type"] == "application/json"
        msg = got.json
        assert list(msg) == list(WEBHOOK_V4_FIELDS)
        assert msg["version"] == "4" and msg["status"] == "firing" and msg["receiver"] == "m1"
        assert msg["groupLabels"] == {"alertname": "FeatureDrift", "model": "m1"}
        assert msg["groupKey"] == '{}:{alertname="FeatureDrift", model="m1"}'
        assert msg["externalURL"] == "http://vigil.test:9095" and msg["truncatedAlerts"] == 0
        assert msg["commonLabels"] == {"alertname": "FeatureDrift", "detector": "ks", "model": "m1",
                                       "version": "v1", "severity": "warning"}
        assert msg["commonAnnotations"] == {"value": "0.4"}
        assert len(msg["alerts"]) == 2
        for a in msg["alerts"]:
            assert list(a) == list(ALERT_V4_FIELDS)
            assert a["status"] == "firing" and a["endsAt"] == "0001-01-01T00:00:00Z"
            assert a["fingerprint"] == fingerprint_hex(a["labels"])
            assert a["startsAt"].endswith("Z") and "T" in a["startsAt"]
            assert a["generatorURL"].startswith("http://vigil.test:9095/api/v1/rules?group=drift&alert=FeatureDrift")
            assert a["annotations"]["summary"] == f"{a['labels']['feature']} of m1 drifted"
        # tampering is detected
        assert got.headers[SIGNATURE_HEADER] != sign(SECRET, got.body + b" ")
        # resolution
        core.ingest(drift_signal(model="m1", feature="latency", drifted=False))
        core.ingest(drift_signal(model="m1", feature="ttft", drifted=False))
        await recorder.wait_for(2)
        msg = recorder.received[1].json
        assert msg["status"] == "resolved"
        assert all(a["status"] == "resolved" and a["endsAt"] != "0001-01-01T00:00:00Z" for a in msg["alerts"])
        assert core.metric("vigil_alerting_notifications_total", receiver="m1", integration="m1/webhook/0") == 2
    finally:
        await core.stop()


async def test_receiver_down_retries_then_counts_a_failure_and_state_stays(recorder):
    recorder.fail_with = 503
    core = await make_core(config(("m1", recorder.url), gi="400ms"))
    try:
        core.ingest(drift_signal(model="m1"))
        failed = lambda: core.metric("vigil_alerting_notifications_failed_total",  # noqa: E731
                                     receiver="m1", integration="m1/webhook/0")
        await until(lambda: failed() >= 1, 10, "the notification given up on")
        assert recorder.attempts == 3  # max_attempts
        assert core.metric("vigil_alerting_notification_retries_total", receiver="m1", integration="m1/webhook/0") >= 2
        assert [i.state for i in core.engine.instances.values()] == ["firing"]
        assert core.nflog.entries == {}  # nothing recorded as sent
        recorder.fail_with = 0  # the receiver comes back: the next group_interval delivers
        [got] = await recorder.wait_for(1, timeout=3)
        assert got.json["status"] == "firing"
        await core.drain()
        assert len(core.nflog.entries) == 1
    finally:
        await core.stop()


async def test_unreachable_and_hanging_receivers_fail_cleanly():
    hang = await WebhookRecorder(delay=1).start()
    cfg = config(("m1", "http://127.0.0.1:9/nothing-listens"), ("m2", hang.url), attempts=2, timeout="150ms")
    core = await make_core(cfg)
    try:
        core.ingest(drift_signal(model="m1"))
        core.ingest(drift_signal(model="m2"))
        await until(lambda: all(core.metric("vigil_alerting_notifications_failed_total", receiver=m,
                                            integration=f"{m}/webhook/0") >= 1 for m in ("m1", "m2")),
                    10, "both notifications given up on")
        assert hang.attempts >= 2
    finally:
        await core.stop()
        await hang.stop()


async def test_slow_receiver_does_not_stall_the_others(recorder):
    slow = await WebhookRecorder(delay=1.5, secret=SECRET).start()
    core = await make_core(config(("fast", recorder.url), ("slow", slow.url)))
    try:
        t0 = time.perf_counter()
        for i in range(20):  # a burst for the slow receiver first
            core.ingest(drift_signal(model="slow", feature=f"label:{i}"))
        core.ingest(drift_signal(model="fast"))
        await recorder.wait_for(1, timeout=3)
        assert recorder.received[0].mono - t0 < 0.5
        assert slow.received == []
        await slow.wait_for(1, timeout=5)
    finally:
        await core.stop()
        await slow.stop()


async def test_silences_from_the_cli(recorder):
    core = await make_core(config(("m1", recorder.url)))
    admin = AdminServer(core, port=0)
    await admin.start()
    url = admin.url
    try:
        args = ["--url", url, "create", "-m", 'model="m1"', "-m", 'feature=~"lat.*"', "--author", "alice",
                "--comment", "known issue", "--duration", "1h"]
        rc = await asyncio.to_thread(silences_main, args)
        assert rc == 0
        [s] = core.silences.list(time.time())
        assert (s.created_by, s.comment, [str(m) for m in s.matchers]) == (
            "alice", "known issue", ['model="m1"', 'feature=~"lat.*"'])
        core.ingest(drift_signal(model="m1", feature="latency"))  # silenced
        core.ingest(drift_signal(model="m1", feature="ttft"))  # not
        [got] = await recorder.wait_for(1)
        assert [a["labels"]["feature"] for a in got.json["alerts"]] == ["ttft"]
        assert core.metric("vigil_alerting_suppressed_total", reason="silenced", receiver="m1") >= 1
        alerts = json.loads(await asyncio.to_thread(_get, f"{url}/api/v2/alerts"))
        states = {a["labels"]["feature"]: a["status"] for a in alerts}
        assert states["latency"]["state"] == "suppressed" and states["latency"]["silencedBy"] == [s.id]
        listed = await asyncio.to_thread(_run_cli, ["--url", url, "list", "--json"])
        assert json.loads(listed)[0]["id"] == s.id
        assert await asyncio.to_thread(silences_main, ["--url", url, "expire", s.id]) == 0
        assert core.silences.list(time.time(), ("active",)) == []
        await recorder.wait_for(2)  # the next group_interval tells about latency too
        assert {a["labels"]["feature"] for a in recorder.received[1].json["alerts"]} == {"latency", "ttft"}
        # a bad silence is refused with the reason
        assert await asyncio.to_thread(silences_main, ["--url", url, "create", "-m", 'model=~".*"',
                                                       "--comment", "all"]) == 1
    finally:
        await admin.stop()
        await core.stop()


def _get(url: str) -> str:
    import urllib.request
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _run_cli(args) -> str:
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert silences_main(args) == 0
    return buf.getvalue()


async def test_reload_keeps_last_good_rules(tmp_path, recorder):
    good = tmp_path / "rules.yml"
    good.write_text(RULES)
    core = await make_core(config(("m1", recorder.url)))
    core.rule_files = [str(good)]
    admin = AdminServer(core, port=0)
    await admin.start()
    try:
        core.ingest(drift_signal(model="m1"))
        good.write_text(RULES.replace("detector: ks", "detector: kss"))
        errors = core.reload()
        assert errors and "no processor publishes the detector 'kss' (did you mean ks" in str(errors[0])
        assert [r.name for r in core.engine.rules.rules] == ["FeatureDrift"]
        assert [i.state for i in core.engine.instances.values()] == ["firing"]
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as ei:
            await asyncio.to_thread(urllib.request.urlopen,
                                    urllib.request.Request(f"{admin.url}/-/reload", method="POST"))
        assert ei.value.code == 500
        good.write_text(RULES + """
      - alert: Extra
        signal: {detector: psi}
""")
        assert core.reload() == []
        assert [r.name for r in core.engine.rules.rules] == ["FeatureDrift", "Extra"]
        assert [i.state for i in core.engine.instances.values()] == ["firing"]  # kept across the reload
    finally:
        await admin.stop()
        await core.stop()


async def test_ha_pair_sends_each_notification_once(recorder):
    """Two instances see the same signals; the standby (position 1) waits peer_timeout and
    finds the notification in the log its peer shares (here directly; Kafka in the service)."""
    cfg = config(("m1", recorder.url))
    a = await make_core(cfg, peer_position=0, peer_timeout=0.3)
    b = await make_core(cfg, peer_position=1, peer_timeout=0.3)
    a.nflog.on_log = lambda e: b.merge_nflog(e.to_dict())
    b.nflog.on_log = lambda e: a.merge_nflog(e.to_dict())
    try:
        for f in ("latency", "ttft"):
            s = drift_signal(model="m1", feature=f)
            a.ingest(s)
            b.ingest(s)
        await recorder.wait_for(1)
        await until(lambda: b.metric("vigil_alerting_suppressed_total", reason="sent_by_peer", receiver="m1"),
                    10, "the standby finding its peer's notification")
        await a.drain()
        await b.drain()
        assert len(recorder.received) == 1
        assert b.metric("vigil_alerting_suppressed_total", reason="sent_by_peer", receiver="m1") == 1
        # the primary dies; the standby alone still notifies (after its wait)
        await a.stop()
        s = drift_signal(model="m1", feature="mean_logprob")
        b.ingest(s)
        await recorder.wait_for(2, timeout=3)
        assert {x["labels"]["feature"] for x in recorder.received[1].json["alerts"]} == {
            "latency", "ttft", "mean_logprob"}
    finally:
        await b.stop()
        if a.started:
            await a.stop()


async def test_restarted_core_neither_resends_nor_forgets(recorder):
    cfg = config(("m1", recorder.url))
    a = await make_core(cfg)
    a.ingest(drift_signal(model="m1"))
    await recorder.wait_for(1)
    await a.drain()
    state = json.loads(json.dumps(a.snapshot()))  # as it would be persisted
    await a.stop()

    b = await make_core(cfg, state=state)
    try:
        assert [i.state for i in b.engine.instances.values()] == ["firing"]
        b.ingest(drift_signal(model="m1"))
        assert b.dispatcher.groups and b.dispatcher.flush_now() == []  # the restored log says it was sent
        await b.drain()
        assert len(recorder.received) == 1
        b.ingest(drift_signal(model="m1", drifted=False))
        await recorder.wait_for(2)
        assert recorder.received[1].json["status"] == "resolved"
    finally:
        await b.stop()


async def test_a_failure_building_an_alertmanager_post_is_counted_and_the_feed_goes_on():
    """The Alertmanager feed is one long-lived task: a fault while it builds a post (here
    injected in `payload`) is logged and counted as a failed post, and the next post goes."""
    import aiohttp
    from aiohttp import web

    from alerting.clock import SystemClock
    from alerting.config import AlertmanagerTarget
    from alerting.signals import Alert
    from alerting.sinks import AlertmanagerSink

    posts, results = [], []
    app = web.Application()

    async def receive(request):
        posts.append(await request.json())
        return web.Response()
    app.router.add_post("/api/v2/alerts", receive)
    runner, port = await listen(app, "127.0.0.1", 0, "the Alertmanager stand-in")
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession()
    sink = AlertmanagerSink(AlertmanagerTarget(url, backoff=0.01), lambda: session, SystemClock(), lambda: [],
                            on_result=lambda ok, n, err: results.append((ok, n, err)))
    build, calls = sink.payload, []

    def faulty(alerts, now):
        calls.append(len(alerts))
        if len(calls) == 1:
            raise RuntimeError("injected payload fault")
        return build(alerts, now)
    sink.payload = faulty
    try:
        sink.put(Alert({"alertname": "A"}, {}, time.time(), None, 1))
        await until(lambda: results, 10, "the failed post counted")
        assert results[0][:2] == (False, 1) and "injected payload fault" in results[0][2]
        sink.put(Alert({"alertname": "B"}, {}, time.time(), None, 2))
        await until(lambda: posts, 10, "the next post")
        assert [a["labels"]["alertname"] for a in posts[0]] == ["B"] and results[-1][0]
    finally:
        await sink.close()
        await session.close()
        await runner.cleanup()

"""Against a real Alertmanager (Debian package prometheus-alertmanager) on loopback: Vigil
posts its alerts through the v2 API, Alertmanager forwards them to a test webhook, and the
fingerprints agree everywhere; Vigil's own webhook JSON has exactly the fields
Alertmanager's has; amtool manages Vigil's silences through the admin API."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request

import pytest

from alerting.admin import AdminServer
from alerting.config import config_from_text
from alerting.core import AlertingCore
from alerting.labels import fingerprint_hex
from alerting.rules import rules_from_text
from eventbus.broker import free_port
from tests.helpers.tools import require_tool
from tests.helpers.webhooks import WebhookRecorder, drift_signal

pytestmark = pytest.mark.asyncio(loop_scope="session")


RULES = """
groups:
  - name: drift
    rules:
      - alert: FeatureDrift
        signal: {detector: ks, drifted: true}
        labels: {severity: warning}
        annotations:
          summary: "{{ $labels.feature }} of {{ $labels.model }} drifted"
"""


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
async def alertmanager(tmp_path):
    hook = await WebhookRecorder().start()
    port = free_port()
    cfg = tmp_path / "am.yml"
    cfg.write_text(f"""
route:
  receiver: hook
  group_by: [alertname, model]
  group_wait: 100ms
  group_interval: 500ms
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: {hook.url}
        send_resolved: true
""")
    proc = subprocess.Popen([require_tool("prometheus-alertmanager", "alertmanager"), f"--config.file={cfg}", f"--storage.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
                             "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            await asyncio.to_thread(get_json, f"{url}/api/v2/status")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"alertmanager did not start: {proc.stderr.read().decode()[-2000:]}")
            await asyncio.sleep(0.1)
    yield url, hook
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    await hook.stop()


async def test_real_alertmanager_receives_vigil_alerts(alertmanager):
    am_url, am_hook = alertmanager
    own_hook = await WebhookRecorder().start()
    core = AlertingCore(rules_from_text(RULES), config_from_text(f"""
global: {{external_url: "http://vigil.test:9095"}}
route: {{receiver: own, group_by: [alertname, model], group_wait: 100ms, group_interval: 500ms}}
receivers:
  - name: own
    webhook_configs: [{{url: "{own_hook.url}"}}]
alertmanagers:
  - url: {am_url}
    resend_interval: 1m
"""))
    await core.start()
    try:
        for f in ("latency", "ttft"):
            core.ingest(drift_signal(model="smollm2", feature=f))
        ours = {f"{i.fp:016x}" for i in core.engine.instances.values()}
        [from_am] = await am_hook.wait_for(1, timeout=10)
        [from_us] = await own_hook.wait_for(1, timeout=10)
        am_alerts = await asyncio.to_thread(get_json, f"{am_url}/api/v2/alerts")
        # one identity everywhere: our fingerprint, Alertmanager's API and its webhook
        assert {a["fingerprint"] for a in am_alerts} == ours
        assert {a["fingerprint"] for a in from_am.json["alerts"]} == ours
        assert all(a["fingerprint"] == fingerprint_hex(a["labels"]) for a in am_alerts)
        # our webhook JSON has exactly the fields Alertmanager's has, with the same meaning
        am_msg, our_msg = from_am.json, from_us.json
        assert list(our_msg) == list(am_msg)
        assert list(our_msg["alerts"][0]) == list(am_msg["alerts"][0])
        for k in ("version", "status", "groupKey", "groupLabels", "commonLabels", "commonAnnotations",
                  "truncatedAlerts"):
            assert our_msg[k] == am_msg[k], k
        assert our_msg["groupKey"] == '{}:{alertname="FeatureDrift", model="smollm2"}'
        by_fp = {a["fingerprint"]: a for a in am_msg["alerts"]}
        for a in our_msg["alerts"]:
            b = by_fp[a["fingerprint"]]
            assert (a["labels"], a["annotations"], a["generatorURL"], a["endsAt"]) == (
                b["labels"], b["annotations"], b["generatorURL"], b["endsAt"])
            assert abs(_t(a["startsAt"]) - _t(b["startsAt"])) < 0.01
        # resolution travels too
        for f in ("latency", "ttft"):
            core.ingest(drift_signal(model="smollm2", feature=f, drifted=False))
        await am_hook.wait_for(2, timeout=10)
        resolved = am_hook.received[-1].json
        assert resolved["status"] == "resolved" and {a["fingerprint"] for a in resolved["alerts"]} == ours
        assert core.metric("vigil_alerting_alertmanager_alerts_total", url=am_url, result="ok") >= 4
    finally:
        await core.stop()
        await own_hook.stop()


def _t(s: str) -> float:
    from alerting.durations import parse_rfc3339
    return parse_rfc3339(s)


async def test_amtool_manages_vigil_silences():
    amtool_path = require_tool("amtool")
    core = AlertingCore(rules_from_text(RULES), config_from_text("route: {receiver: x}\nreceivers: [{name: x}]\n"))
    await core.start()
    admin = AdminServer(core, port=0)
    await admin.start()
    try:
        def amtool(*args):
            out = subprocess.run([amtool_path, f"--alertmanager.url={admin.url}", *args], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            return out.stdout
        sid = (await asyncio.to_thread(amtool, "silence", "add", "model=smollm2", 'feature=~"lat.*"',
                                       "--comment=deploy in progress", "--author=bob", "--duration=2h")).strip()
        [s] = core.silences.list(time.time())
        assert s.id == sid and s.created_by == "bob" and s.comment == "deploy in progress"
        assert [str(m) for m in s.matchers] == ['model="smollm2"', 'feature=~"lat.*"']
        listed = json.loads(await asyncio.to_thread(amtool, "silence", "query", "-o", "json"))
        assert [x["id"] for x in listed] == [sid]
        await asyncio.to_thread(amtool, "silence", "expire", sid)
        assert core.silences.list(time.time(), ("active",)) == []
    finally:
        await admin.stop()
        await core.stop()

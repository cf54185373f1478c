"""`vigil ui` without a browser: the bounded model, and the service on a real broker
(Tansu, embedded): real Signal, Alert, RolloutState and InferenceEvent records in,
`/api/state` and the server-sent events out; the command prints its URL, serves the
page and plotly.js from the installed package, and refuses a busy port by name."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import pytest

from console.model import Caps, Model
from console.reader import TOPICS
from console.service import Console, Options
from tests.helpers import ROOT
from tests.helpers.messages import alert, drift, ece, ensure_topics, produce, request, rollout
from tests.helpers.waiting import until
from protos import events_pb2

on_session_loop = pytest.mark.asyncio(loop_scope="session")  # as the fixtures

class Stream:
    """The server-sent events of /api/events, parsed."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response

    async def next(self, timeout: float = 15.0) -> tuple[str, dict]:
        event, data = "message", []
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.response.content.readline()).decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and data:
                    return event, json.loads("\n".join(data))

    async def until(self, match, what: str, timeout: float = 15.0) -> dict:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event, data = await self.next(timeout)
                    if match(event, data):
                        return data
        except TimeoutError:
            raise AssertionError(f"no {what} on /api/events within {timeout} s") from None


def test_figures_from_events_and_caps_keep_memory_flat():
    caps = Caps(readings=5, series=3, decisions=4, models=2, alerts=2, alert_changes=3, versions=2,
                recent_events=50, bucket_s=5.0, buckets=4, window_s=60.0)
    model, now = Model(caps), 1_000_000.0
    for i in range(20):  # 20 requests in 20 s: total seconds 0.1 .. 2.0, the last two errors
        m = request("m", "1", total=(i + 1) / 10, ok=i < 18, tokens=5, t=now - 20 + i)
        model.apply(m, 0)
    t = model.snapshot(now)["traffic"][0]
    c = t["current"]
    assert (c["requests"], c["errors"]) == (20, 2) and c["error_rate"] == pytest.approx(0.1)
    assert c["rate"] == pytest.approx(20 / 60) and c["tokens_per_s"] == pytest.approx(18 * 5 / 60)
    assert (c["p50"], c["p95"], c["p99"]) == pytest.approx((0.9, 1.8, 1.8))  # of the 18 that succeeded
    assert c["ttft_p50"] == pytest.approx(0.09)
    assert [p["requests"] for p in t["points"]] == [5, 5, 5, 5] and t["points"][-1]["errors"] == 2
    for i in range(20):
        model.apply(request("m", "1", total=0.1, t=now + i), 0)
    assert len(model.snapshot(now + 20)["traffic"][0]["points"]) == 4 + 1  # 4 kept, and the open one

    for i in range(100):  # far past every cap
        model.apply(drift(f"m{i % 7}", "1", feature=f"f{i % 5}", t=now + i), 0)
        model.apply(alert(f"m{i}", "1", events_pb2.ALERT_STATE_FIRING), 0)
        model.apply(rollout(f"m{i % 2}", i, events_pb2.ROLLOUT_PHASE_CANARY, {"1": 0.9, "2": 0.1}, "step"), 0)
        model.apply(request(f"m{i}", "1", 0.1, t=now + i), 0)
    s = model.snapshot(now + 100)
    assert len(s["signals"]) == 3 and all(len(x["readings"]) <= 5 for x in s["signals"])
    assert len(s["alerts"]) == 2 and len(s["alert_changes"]) == 3
    assert set(s["models"]) == {"m0", "m1"} and all(len(m["history"]) == 4 for m in s["models"].values())
    assert len(s["traffic"]) == 2
    json.dumps(s, allow_nan=False)


def test_nan_and_infinity_become_null_and_the_same_decision_is_kept_once():
    model = Model()
    change = model.apply(drift("m", "1", statistic=float("inf")), 0)
    assert change["reading"][1] is None and change["series"]["latest"]["statistic"] is None
    a = alert("m", "1", events_pb2.ALERT_STATE_FIRING)
    a.value = float("nan")
    assert model.apply(a, 0)["alert"]["value"] is None
    r = rollout("m", 3, events_pb2.ROLLOUT_PHASE_CANARY, {"1": 0.75, "2": 0.25}, "step 1 passed")
    model.apply(r, 0)
    model.apply(r, 0)
    assert len(model.snapshot()["models"]["m"]["history"]) == 1
    json.dumps(model.snapshot(), allow_nan=False)


@on_session_loop
async def test_state_and_stream_follow_every_topic(kafka_broker):
    bootstrap = kafka_broker.bootstrap_servers
    await ensure_topics(bootstrap)
    name = f"ui-{uuid.uuid4().hex[:6]}"
    # before the page starts: read from the backlog (signals) and from the beginning (rollout)
    await produce(bootstrap, rollout(name, 1, events_pb2.ROLLOUT_PHASE_STABLE, {"1": 1.0}, "loaded"),
                  drift(name, "1", statistic=0.05, drifted=False))
    console = Console(Options(bootstrap_servers=bootstrap, port=0))
    await console.start()
    try:
        async with aiohttp.ClientSession() as http:
            async def state():
                async with http.get(console.url + "api/state") as r:
                    assert r.status == 200 and r.content_type == "application/json"
                    return await r.json()

            await until(lambda: len(console.reader.following) == len(TOPICS), 15, "every topic followed")
            s = await until(lambda: state_with(state, lambda s: name in s["models"] and any(
                x["model"] == name for x in s["signals"])), 15, "the records from before the start")
            assert s["models"][name]["latest"]["phase"] == "stable"

            async with http.get(console.url + "api/events") as r:
                assert r.headers["Content-Type"] == "text/event-stream"
                stream = Stream(r)
                event, first = await stream.next()
                assert event == "state" and name in first["models"]

                await produce(bootstrap, rollout(name, 2, events_pb2.ROLLOUT_PHASE_CANARY, {"1": 0.75, "2": 0.25},
                                                 "canary: 25 percent, step 1 of 3", step=1))
                d = await stream.until(lambda e, d: e == "rollout" and d["decision"]["model"] == name, "decision")
                assert d["decision"]["weights"] == {"1": 0.75, "2": 0.25} and d["decision"]["step"] == 1
                assert d["decision"]["figures"] == {"errors": {"candidate": 0.0}}

                await produce(bootstrap, drift(name, "2"), ece(name, "2", 0.15))
                d = await stream.until(lambda e, d: e == "signal" and d["series"]["model"] == name
                                       and d["series"]["detector"] == "ks", "drift signal")
                assert d["series"]["version"] == "2" and d["series"]["kind"] == "drift"
                assert d["reading"][1:4] == [0.4, 0.2, True] and d["series"]["latest"]["detections"] == 1
                d = await stream.until(lambda e, d: e == "signal" and d["series"]["detector"] == "ece"
                                       and d["series"]["model"] == name, "ece signal")
                assert [b["count"] for b in d["series"]["latest"]["reliability"]] == [10, 11, 12, 13]

                await produce(bootstrap, alert(name, "2", events_pb2.ALERT_STATE_FIRING, label="<script>x</script>"))
                d = await stream.until(lambda e, d: e == "alert" and d["alert"]["labels"]["model"] == name, "alert")
                assert d["alert"]["state"] == "firing" and d["alert"]["labels"]["team"] == "<script>x</script>"

                now = time.time()
                await produce(bootstrap, *[request(name, "2", total=0.1 * (i + 1), ok=i != 0, t=now) for i in range(10)])
                d = await stream.until(lambda e, d: e == "traffic" and any(
                    v["model"] == name and v["current"]["requests"] == 10 for v in d["versions"]), "request figures")
                v = next(v for v in d["versions"] if v["model"] == name)
                assert v["current"]["errors"] == 1 and v["current"]["p50"] == pytest.approx(0.6)
                assert v["current"]["tokens_per_s"] == pytest.approx(90 / 60)

            s = await state()
            assert [d["generation"] for d in s["models"][name]["history"]] == [1, 2]
            mine = {(x["version"], x["detector"]): x for x in s["signals"] if x["model"] == name}
            assert set(mine) == {("1", "ks"), ("2", "ks"), ("2", "ece")}
            assert s["signal_columns"] == ["t", "statistic", "threshold", "drifted", "p_value"]
            assert [r[3] for r in mine["2", "ks"]["readings"]] == [True]
            assert next(a for a in s["alerts"] if a["labels"]["model"] == name)["annotations"]["runbook"] == "<b>bold</b>"
            assert s["down"] == [] and s["undecodable"] == 0
    finally:
        await console.stop()


async def state_with(state, check):
    s = await state()
    return s if check(s) else None


def test_the_command_prints_its_url_serves_the_page_and_stops_on_sigterm(kafka_broker):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "ui", "--bootstrap-servers",
                             kafka_broker.bootstrap_servers, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("vigil ui: http://127.0.0.1:"), line
        url = line.split()[2]

        async def fetch():
            async with aiohttp.ClientSession() as http:
                async with http.get(url) as r:
                    page = await r.text()
                    assert r.status == 200 and "Content-Security-Policy" in r.headers
                async with http.get(url + "assets/plotly.min.js") as r:
                    js = await r.read()
                async with http.get(url + "assets/nothing.js") as r:
                    missing = r.status
            return page, js, missing

        page, js, missing = asyncio.run(fetch())
        assert "/assets/plotly.min.js" in page and "/assets/page.js" in page
        assert b"plotly.js v" in js[:200] and len(js) > 1_000_000 and missing == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_busy_port_is_refused_by_name():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "vigil.cli", "ui", "--bootstrap-servers", "127.0.0.1:1",
                            "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"vigil ui: --port: cannot listen on 127.0.0.1:{port}: address already in use" in r.stderr


@on_session_loop
async def test_topics_created_after_the_start_are_followed():
    from eventbus.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:  # a broker of its own, without the topics
        console = Console(Options(bootstrap_servers=broker.bootstrap_servers, port=0))
        await console.start()
        try:
            assert console.reader.following == []
            await ensure_topics(broker.bootstrap_servers)
            await until(lambda: console.reader.following == sorted(TOPICS), 15, "the new topics followed")
            await produce(broker.bootstrap_servers, drift("late", "1"))
            await until(lambda: console.model.series, 15, "the signal read")
        finally:
            await console.stop()

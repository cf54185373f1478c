"""The page (`vigil ui`): how long a new alert takes to show, and its memory over an hour.

1. Alert to page: an embedded broker, `vigil ui` in a process of its own, the page open in
   Debian's headless Chromium (selenium). Each round publishes one Alert record of a new
   fingerprint on vigil.alerts; a MutationObserver in the page notes (Date.now()) when its
   row appears in the DOM. Latency = that moment minus the moment before the record was
   sent (one clock: same machine). The page redraws at most every 300 ms (its batching of
   changes), which is most of the figure.
2. Memory over an hour: a fresh `vigil ui`, fed an hour of the loop's records in event time
   as fast as the broker takes them: 288 signal series (4 models x 3 versions x 12 features
   x 2 detectors) each with a reading every 10 s, the request events of 10 requests/s, an
   alert change a minute, a rollout decision every 5 minutes. Its RSS (/proc/PID/status)
   after start-up, then after each quarter hour has been read (the page's records counter
   reached it).

Run: .venv/bin/python bench/bench_page.py [--rounds 30] [--minutes 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from aiokafka import AIOKafkaProducer  # noqa: E402

from bench.common import REPO, percentile  # noqa: E402
from eventbus import cloudevents, codec, topics  # noqa: E402
from eventbus.broker import EmbeddedBroker  # noqa: E402
from eventbus.kafka import Kafka  # noqa: E402
from protos import events_pb2  # noqa: E402

TOPIC_OF = {events_pb2.Signal: topics.SIGNALS, events_pb2.Alert: topics.ALERTS,
            events_pb2.RolloutState: topics.ROLLOUT, events_pb2.InferenceEvent: topics.INFERENCE}
WATCH = """
window.seen = {};
new MutationObserver(() => {
  for (const r of document.querySelectorAll("tr.alert")) {
    const fp = r.dataset.fingerprint;
    if (!(fp in window.seen)) window.seen[fp] = Date.now();
  }
}).observe(document.getElementById("alert-list"), {childList: true, subtree: true});
"""


def start_ui(bootstrap: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", "ui", "--bootstrap-servers", bootstrap, "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    if not line.startswith("vigil ui: http://"):
        raise SystemExit(f"vigil ui did not start: {line}{proc.stdout.read()}")
    return proc, line.split()[2]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) / 1024


def state(url: str) -> dict:
    with urllib.request.urlopen(url + "api/state", timeout=30) as r:
        return json.loads(r.read())


class Out:
    def __init__(self, bootstrap: str):
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=256 * 1024)
        self.pending: list = []
        self.sent = 0

    async def send(self, m) -> None:
        key = (topics.model_key(m.model, m.version) if isinstance(m, events_pb2.Signal)
               else m.fingerprint if isinstance(m, events_pb2.Alert) else m.model)
        headers = cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "bench", time.time(), codec.PROTOBUF)
        self.pending.append(await self.producer.send(TOPIC_OF[type(m)], codec.encode(m), key=key.encode(),
                                                     headers=headers))
        self.sent += 1
        if len(self.pending) >= 2000:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.gather(*self.pending)
        self.pending.clear()


def stamp(m, t: float):
    m.event_id = str(uuid.uuid4())
    m.source = "bench"
    m.time.FromNanoseconds(int(t * 1e9))
    return m


def alert(i: int, model: str, state_: int, t: float) -> events_pb2.Alert:
    return stamp(events_pb2.Alert(
        fingerprint=f"bench-{model}-{i}", rule="MeanLogprobDrift", state=state_, severity="warning",
        labels={"alertname": "MeanLogprobDrift", "model": model, "version": "2", "feature": f"f{i}"},
        annotations={"summary": f"round {i}"}, value=0.4), t)


async def alert_latency(bootstrap: str, url: str, rounds: int) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    o = webdriver.ChromeOptions()
    o.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,1200"):
        o.add_argument(flag)
    driver = webdriver.Chrome(options=o, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url)
        while driver.find_element("id", "connection").text != "live":
            await asyncio.sleep(0.05)
        driver.execute_script(WATCH)
        out = Out(bootstrap)
        await out.producer.start()
        model = f"bench-{uuid.uuid4().hex[:6]}"
        latencies = []
        try:
            for i in range(rounds):
                m = alert(i, model, events_pb2.ALERT_STATE_FIRING, time.time())
                sent = time.time() * 1000
                await out.send(m)
                await out.flush()
                deadline = time.monotonic() + 30
                while (seen := driver.execute_script(f"return window.seen['{m.fingerprint}']")) is None:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"round {i}: the alert did not show within 30 s")
                    await asyncio.sleep(0.02)
                latencies.append(seen - sent)
                await asyncio.sleep(0.5)  # rounds apart, so that each is a fresh change
        finally:
            await out.producer.stop()
        return latencies
    finally:
        driver.quit()


async def an_hour(bootstrap: str, url: str, pid: int, minutes: int) -> list[tuple[str, float, int]]:
    rng = random.Random(1)
    models = [f"hour-{i}" for i in range(4)]
    versions = ["1", "2", "3"]
    features = ["prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob",
                "total_seconds", "first_token_seconds", "finish_reason", "error", "label", "score", "length"]
    out = Out(bootstrap)
    await out.producer.start()
    figures = [("after start-up", rss_mib(pid), 0)]
    start = time.time() - minutes * 60
    try:
        for minute in range(minutes):
            for second in range(0, 60, 10):  # a reading per series every 10 s
                t = start + minute * 60 + second
                for m in models:
                    for v in versions:
                        for f in features:
                            for d in ("ks", "psi"):
                                s = rng.random()
                                await out.send(stamp(events_pb2.Signal(
                                    model=m, version=v, kind=events_pb2.SIGNAL_KIND_DRIFT, detector=d, feature=f,
                                    statistic=s, threshold=0.2, drifted=s > 0.9, events=400,
                                    labels={"route": "stable"}), t))
                for i in range(100):  # 10 requests a second
                    m, v = rng.choice(models), rng.choice(versions)
                    await out.send(stamp(events_pb2.InferenceEvent(
                        request_id=str(uuid.uuid4()), method="Generate", model=m, version=v,
                        status=events_pb2.STATUS_OK, total_seconds=rng.uniform(0.1, 1.0),
                        first_token_seconds=rng.uniform(0.01, 0.1), completion_tokens=rng.randint(5, 50)), t + i / 10))
            t = start + minute * 60
            await out.send(alert(minute % 40, rng.choice(models),
                                 rng.choice([events_pb2.ALERT_STATE_FIRING, events_pb2.ALERT_STATE_RESOLVED]), t))
            if minute % 5 == 0:
                await out.send(stamp(events_pb2.RolloutState(
                    model=rng.choice(models), stable_version="1", candidate_version="2",
                    phase=events_pb2.ROLLOUT_PHASE_CANARY, generation=minute + 1, reason=f"step at minute {minute}",
                    weights=[events_pb2.VersionWeight(version="1", weight=0.9),
                             events_pb2.VersionWeight(version="2", weight=0.1)]), t))
            if (minute + 1) % 15 == 0 or minute + 1 == minutes:
                await out.flush()
                sent = out.sent
                deadline = time.monotonic() + 600
                while (read := state(url)["records"]) < sent:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the page read {read} of {sent} records in 10 minutes")
                    await asyncio.sleep(0.5)
                figures.append((f"{minute + 1} minutes of records read", rss_mib(pid), read))
    finally:
        await out.producer.stop()
    return figures


async def make_topics(bootstrap: str) -> None:
    await Kafka(bootstrap).ensure_topics("bench-page", list(TOPIC_OF.values()), topics.TopicOptions(partitions=3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30, help="alerts published one at a time")
    p.add_argument("--minutes", type=int, default=60, help="minutes of records (event time) fed to the page")
    args = p.parse_args()
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(make_topics(bootstrap))
        proc, url = start_ui(bootstrap)
        try:
            lat = asyncio.run(alert_latency(bootstrap, url, args.rounds))
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"alert published -> row on the page, {len(lat)} alerts: p50 {percentile(lat, 0.5):.0f} ms, "
              f"p95 {percentile(lat, 0.95):.0f} ms, max {max(lat):.0f} ms (the page batches redraws 300 ms)")
        proc, url = start_ui(bootstrap)  # a fresh page for the memory figure
        try:
            began = time.monotonic()
            figures = asyncio.run(an_hour(bootstrap, url, proc.pid, args.minutes))
            took = time.monotonic() - began
            s = state(url)
        finally:
            proc.terminate()
            proc.wait(30)
        print(f"memory of vigil ui over {args.minutes} minutes of records (fed in {took:.0f} s):")
        for what, rss, read in figures:
            print(f"  {what:<32} RSS {rss:7.1f} MiB  ({read} records)")
        print(f"  kept: {len(s['signals'])} signal series, {sum(len(x['readings']) for x in s['signals'])} readings, "
              f"{len(s['traffic'])} versions with request figures, {len(s['alerts'])} alerts")


if __name__ == "__main__":
    main()

"""Drift response end to end on real processes: the embedded broker, `vigil process`,
`vigil alerting` and `vigil rollout --policy` as child processes, events and Feedback
scores written here as servers write them.

Two models, each promoted from version 1 to 2 through the controller's admin API:
- `bad`: version 2's Feedback scores fall after its promotion (mean 0.8 -> 0.2): ADWIN on
  the scores (the processors) -> a critical alert (alerting) -> the policy's fallback
  (the controller): all traffic back on version 1, the reason naming the alert.
- `quiet`: version 2 stays healthy through a long, low-traffic run: no action at all.
- `calib`: version 2 is over-confident (Classify: top label 0.95, right 60% of the time):
  HighCalibrationError fires, the processors fit a temperature, and the policy's
  recalibrate publishes it in the RolloutState's `temperatures`.
Then SIGHUP with a bad policy file is refused (the error names its line), with a good one
reloads it.

Printed: the time from the alert (its record on vigil.alerts) to the fallback (the
RolloutState on vigil.rollout), and the false actions of the quiet run."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from aiokafka import AIOKafkaProducer
from confluent_kafka import Consumer, TopicPartition

from eventbus import cloudevents, codec, compat, topics
from eventbus.broker import EmbeddedBroker
from eventbus.kafka import Kafka
from protos import events_pb2
from tests.helpers.processes import log_match
from tests.helpers.waiting import wait_until

compat.install()

SCORE_EVERY = 20
INTERVAL = 1.0   # the controller's analysis interval (--default-interval)
RULES = """
groups:
  - name: drift-response
    rules:
      - alert: FeedbackScoreFell
        signal: {detector: adwin, feature: score, drifted: true}
        keep_firing_for: 30s
        labels: {severity: critical, category: quality}
        annotations: {summary: "Feedback scores of {{ $labels.model }}/{{ $labels.version }} changed"}
      - alert: HighCalibrationError
        metric: {name: ece, window: 10s, aggregate: last, above: 0.1}
        labels: {severity: warning, category: calibration}
"""
POLICY = """
rules:
  - name: fallback-on-critical
    matchers: ['severity="critical"', 'category=~"quality|drift"']
    action: fallback
  - name: recalibrate-on-ece
    matchers: ['alertname="HighCalibrationError"']
    action: recalibrate
    min_improvement: 0.01
    min_held_out: 30
"""


def api(url: str, op: str, **kw):
    req = urllib.request.Request(f"{url}/api/{op}", data=json.dumps(kw).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def scored(rng: random.Random, model: str, version: str, mean: float):
    e = events_pb2.InferenceEvent(event_id=str(uuid.uuid4()), request_id=str(uuid.uuid4()), model=model,
                                  version=version, method="Generate", route=events_pb2.ROUTE_STABLE, status=1,
                                  prompt_tokens=20, completion_tokens=16, total_seconds=0.2)
    e.time.GetCurrentTime()
    f = events_pb2.FeedbackEvent(event_id=str(uuid.uuid4()), feedback_id=str(uuid.uuid4()), request_id=e.request_id,
                                 model=model, version=version, score=min(1.0, max(0.0, rng.gauss(mean, 0.1))))
    f.time.GetCurrentTime()
    return [e, f]


def classified(rng: random.Random, model: str, version: str, confidence: float, accuracy: float):
    e = events_pb2.InferenceEvent(event_id=str(uuid.uuid4()), request_id=str(uuid.uuid4()), model=model,
                                  version=version, method="Classify", route=events_pb2.ROUTE_STABLE, status=1,
                                  prompt_tokens=10, total_seconds=0.05)
    top = rng.choice(["yes", "no"])
    other = "no" if top == "yes" else "yes"
    e.label_probabilities.update({top: confidence, other: 1 - confidence})
    e.time.GetCurrentTime()
    f = events_pb2.FeedbackEvent(event_id=str(uuid.uuid4()), feedback_id=str(uuid.uuid4()), request_id=e.request_id,
                                 model=model, version=version, label=top if rng.random() < accuracy else other)
    f.time.GetCurrentTime()
    return [e, f]


class Traffic:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer

    async def send(self, rng, model, version, mean, count, make=None):
        futures = []
        for _ in range(count):
            for m in (make or scored)(rng, model, version, mean):
                topic = topics.INFERENCE if isinstance(m, events_pb2.InferenceEvent) else topics.FEEDBACK
                headers = cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "e2e", time.time(), codec.PROTOBUF)
                futures.append(await self.producer.send(topic, codec.encode(m), key=model.encode(), headers=headers))
        await asyncio.gather(*futures)


def records(bootstrap: str, topic: str, cls, want) -> list:
    """Every record of `topic` so far (to each partition's high watermark) that want(message) keeps."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"e2e-{uuid.uuid4()}", "log_level": 3,
                  "enable.auto.commit": False, "session.timeout.ms": 6000, "max.poll.interval.ms": 6000})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        tps = [TopicPartition(topic, p, 0) for p in parts]
        c.assign(tps)
        out, deadline = [], time.monotonic() + 20
        at = {p: 0 for p in parts}   # the next offset to read (position() knows none before a record)
        while True:
            assert time.monotonic() < deadline, f"{topic} not read to its end"
            r = c.poll(0.2)
            if r is not None and not r.error():
                at[r.partition()] = r.offset() + 1
                m = cls.FromString(r.value())
                if want(m):
                    out.append(m)
            # the high watermarks of the last fetches: Tansu's ListOffsets may answer lower
            if r is None and all(at[t.partition] >= c.get_watermark_offsets(t, cached=True)[1] >= 0 for t in tps):
                return out
    finally:
        c.close()


def test_bad_feedback_falls_back_a_healthy_version_is_left_alone_an_overconfident_one_recalibrated(tmp_path):
    t0 = time.monotonic()
    with EmbeddedBroker() as broker:
        asyncio.run(run(broker.bootstrap_servers, tmp_path, t0))


async def run(bootstrap: str, folder: Path, t0: float) -> None:
    await Kafka(bootstrap).ensure_topics("e2e", topics.ALL, topics.TopicOptions(partitions=3))
    (folder / "rules.yml").write_text(RULES)
    (folder / "policy.yml").write_text(POLICY)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "vigil.cli"]
    logs = {n: folder / f"{n}.log" for n in ("process", "alerting", "rollout")}
    args = {
        "process": ["process", "--group-id", "e2e", "--metrics-port", "0", "--session-timeout-ms", "6000",
                    "--score-every", str(SCORE_EVERY), "--score-window", "100", "--calibration-every", "50",
                    "--recalibration-min", "200", "--recalibration-every", "200"],
        "alerting": ["alerting", "--rules", str(folder / "rules.yml"), "--admin-port", "0"],
        "rollout": ["rollout", "--admin-port", "0", "--tick", "0.25", "--default-interval", str(INTERVAL),
                    "--policy", str(folder / "policy.yml"), "--outbox-dir", str(folder / "outbox")],
    }
    procs = {n: subprocess.Popen(cmd + [a[0], "--bootstrap-servers", bootstrap, *a[1:]],
                                 stdout=logs[n].open("w"), stderr=subprocess.STDOUT, env=env, cwd=folder)
             for n, a in args.items()}
    try:
        log_match(logs["alerting"], "admin and metrics on", procs["alerting"], 90)
        url = log_match(logs["rollout"], r"admin API on (http://[^\s,]+)", procs["rollout"], 90)[1]
        await asyncio.to_thread(log_match, logs["rollout"], "is the leader", procs["rollout"], 90)
        print(f"\nstarted: {time.monotonic() - t0:.1f}s")
        bad, quiet, calib = (f"{n}-{uuid.uuid4().hex[:4]}" for n in ("bad", "quiet", "calib"))
        for model in (bad, quiet, calib):
            api(url, "start", model=model, stable="1", candidate="2", steps=[100], watch=600)
            d = api(url, "promote", model=model)
            assert d["phase"] == "promoted" and d["keep_loaded"] == ["1"], d

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
        await producer.start()
        try:
            traffic = Traffic(producer)
            rq, rb = random.Random(1), random.Random(2)
            quiet_sent, quiet_began = 0, time.monotonic()

            async def quiet_trickle(batches: int):
                nonlocal quiet_sent
                for _ in range(batches):     # low traffic: a few requests at a time, spread out
                    await traffic.send(rq, quiet, "2", 0.8, 10)
                    quiet_sent += 10
                    await asyncio.sleep(0.1)

            # both healthy after their promotion
            t0 = time.monotonic()
            over_confident = lambda rng, m, v, _: classified(rng, m, v, 0.95, 0.6)  # noqa: E731
            await asyncio.gather(quiet_trickle(60), traffic.send(rb, bad, "2", 0.8, 300),
                                 traffic.send(random.Random(3), calib, "2", 0, 400, over_confident))
            print(f"\nhealthy traffic: {time.monotonic() - t0:.1f}s")
            # the bad one's answers get worse; the quiet one goes on
            bad_from = time.monotonic()

            def fell_back():
                return api(url, "status", model=bad)["phase"] == "rolled_back"
            while not await asyncio.to_thread(fell_back):
                assert time.monotonic() - bad_from < 60, logs["rollout"].read_text()[-3000:]
                await asyncio.gather(quiet_trickle(2), traffic.send(rb, bad, "2", 0.2, SCORE_EVERY))
            bad_to_fallback = time.monotonic() - bad_from
            await quiet_trickle(60)
            quiet_seconds = time.monotonic() - quiet_began
        finally:
            await producer.stop()

        status = api(url, "status", model=bad)
        assert status["stable"] == "1" and status["weights"] == {"1": 1.0}, status
        assert "FeedbackScoreFell" in status["reason"] and "from 2 to 1" in status["reason"], status["reason"]
        # the quiet model's scores have all been judged: its last mean-score signal covers them
        want_signals = quiet_sent // SCORE_EVERY

        def quiet_judged():
            sigs = records(bootstrap, topics.SIGNALS, events_pb2.Signal,
                           lambda s: s.model == quiet and s.detector == "mean" and s.feature == "score")
            return len(sigs) >= want_signals
        await asyncio.to_thread(wait_until, quiet_judged, 60, "the quiet model's scores to be judged", 0.5)

        alerts = records(bootstrap, topics.ALERTS, events_pb2.Alert,
                         lambda a: a.labels.get("model") == bad and a.state == events_pb2.ALERT_STATE_FIRING)
        states = records(bootstrap, topics.ROLLOUT, events_pb2.RolloutState,
                         lambda r: r.model == bad and r.phase == events_pb2.ROLLOUT_PHASE_ROLLED_BACK)
        assert alerts and states
        fired = min(a.time.ToNanoseconds() for a in alerts) / 1e9
        acted = min(r.time.ToNanoseconds() for r in states) / 1e9
        assert acted >= fired
        print(f"\nalert to fallback: {acted - fired:.3f}s (analysis interval {INTERVAL:g}s); "
              f"first bad scores to the fallback seen: {bad_to_fallback:.1f}s")
        actions = records(bootstrap, topics.ACTIONS, events_pb2.Action, lambda a: a.model in (bad, quiet))
        false = [a for a in actions if a.model == quiet]
        quiet_alerts = records(bootstrap, topics.ALERTS, events_pb2.Alert, lambda a: a.labels.get("model") == quiet)
        print(f"quiet run: {quiet_sent} scored requests on the promoted version over {quiet_seconds:.1f}s, "
              f"{len(quiet_alerts)} alerts, {len(false)} actions")
        assert false == [] and quiet_alerts == []
        assert api(url, "status", model=quiet)["phase"] == "promoted"
        assert [(a.action, a.outcome, a.target_version) for a in actions] == [("fallback", "done", "1")]
        # the over-confident version got the processors' temperature, where it lowers held-out ECE
        temps = await asyncio.to_thread(wait_until, lambda: api(url, "status", model=calib)["temperatures"], 60,
                                        "the recalibration")
        [recal] = records(bootstrap, topics.ACTIONS, events_pb2.Action,
                          lambda a: a.model == calib and a.outcome == "done")
        fit = json.loads(recal.details_json)
        assert recal.action == "recalibrate" and temps == {"2": fit["temperature"]} and fit["temperature"] > 1
        assert fit["ece_after"] < fit["ece_before"] - 0.01
        print(f"recalibrated {calib} 2: temperature {fit['temperature']:.3g}, held-out ECE {fit['ece_before']:.3f} -> "
              f"{fit['ece_after']:.3f} over {fit['held_out']}")
        # SIGHUP reloads the policy; a bad one is refused, naming its line, and the last good one kept
        (folder / "policy.yml").write_text("rules:\n  - name: x\n    matchers: ['a=\"b\"']\n    action: explode\n")
        procs["rollout"].send_signal(signal.SIGHUP)
        await asyncio.to_thread(log_match, logs["rollout"], re.escape("policy.yml:4: rules[0].action: 'explode'"),
                                procs["rollout"], 90)
        (folder / "policy.yml").write_text(POLICY + "  - {name: more, matchers: ['a=\"b\"'], action: notify-only}\n")
        procs["rollout"].send_signal(signal.SIGHUP)
        await asyncio.to_thread(log_match, logs["rollout"], "reloaded: 3 rules", procs["rollout"], 90)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

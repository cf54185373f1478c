"""Every default alerting rule, end to end on real processes: events on the embedded broker,
`vigil process` turning them into signals, `vigil alerting` with the default rules (only
their durations shortened) notifying a signed webhook. For each rule, traffic that should
set it off is sent until the rule's alert fires, then normal traffic until it resolves. The
receiver here checks the HMAC signature with its own code. Each rule has a model of its own,
and all scenarios run at once on one stack."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from eventbus import cloudevents, codec, compat, topics
from eventbus.broker import EmbeddedBroker
from eventbus.service import listen
from protos import events_pb2
from tests.helpers import ROOT
from tests.helpers.processes import log_match

compat.install()  # the test's own idempotent producer, against Tansu

SECRET = b"scenario-secret"
PROCESSOR = ["--signal-every", "50", "--score-every", "50", "--ks-window", "200", "--psi-window", "200", "--chi2-window", "200",
             "--calibration-every", "50", "--calibration-window", "400", "--quality-window", "10",
             "--compare-every", "50", "--compare-window", "200", "--compare-min", "50"]
DEADLINE = 150.0   # seconds each phase may take on a loaded 2-core machine


def scenario_rules(folder: Path) -> Path:
    """The default rules with their `for` 1s, `keep_firing_for` 2s and metric windows 4s:
    the conditions themselves, names and labels are those that ship."""
    doc = yaml.safe_load((ROOT / "alerting" / "default_rules.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            for key, short in (("for", "1s"), ("keep_firing_for", "2s")):
                if key in rule:
                    rule[key] = short
            if "metric" in rule:
                rule["metric"]["window"] = "4s"
    path = folder / "rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def default_rule_names() -> list[str]:
    doc = yaml.safe_load((ROOT / "alerting" / "default_rules.yml").read_text())
    return [r["alert"] for g in doc["groups"] for r in g["rules"]]


CONFIG = """
route:
  receiver: hook
  group_by: [alertname, model, version, feature]
  group_wait: 100ms
  group_interval: 300ms
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs:
      - url: "{url}"
        backoff: 10ms
"""


class Receiver:
    """A webhook receiver that trusts nothing it cannot verify."""

    def __init__(self):
        self.alerts: list[dict] = []       # every alert of every notification, in order
        self.bad_signatures = 0
        self.changed = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, request.headers.get("X-Vigil-Signature", "")):
            self.bad_signatures += 1
            return web.Response(status=401)
        doc = json.loads(body)
        if doc.get("version") != "4":
            return web.Response(status=400)
        now = time.monotonic()
        self.alerts.extend(dict(a, received=now) for a in doc["alerts"])
        self.changed.set()
        return web.Response()

    def of(self, rule: str, model: str) -> list[dict]:
        return [a for a in self.alerts if a["labels"]["alertname"] == rule and a["labels"]["model"] == model]

    def fired(self, rule: str, model: str) -> bool:
        return any(a["status"] == "firing" for a in self.of(rule, model))

    def resolved(self, rule: str, model: str) -> bool:
        """Every alert of the rule and model that fired is now resolved."""
        last = {}
        for a in self.of(rule, model):
            last[a["fingerprint"]] = a["status"]
        return bool(last) and all(s == "resolved" for s in last.values())

    async def wait(self, timeout: float) -> None:
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass


# -- traffic ---------------------------------------------------------------------------------

@dataclass
class Scenario:
    rule: str
    good: callable          # (i, rng, version) -> list of (topic, message)
    bad: callable
    versions: tuple = ("v1",)
    result: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return "m-" + self.rule.lower()


def inference(i: int, rng: random.Random, version: str = "v1", *, route=events_pb2.ROUTE_STABLE, status=1,
              prompt=(20, 40), completion=24, entropy=2.0, logprob=-1.0, top1=(0.3, 0.9), total=(0.2, 0.4),
              first=(0.02, 0.05), finish=0.9, tokens=None, **_):
    e = events_pb2.InferenceEvent(
        event_id=f"{version}-{i}-{rng.random()}", request_id=f"r{rng.random()}", method="Generate", version=version,
        route=route, status=status, prompt_tokens=rng.randint(*prompt), completion_tokens=completion,
        finish_reason="stop" if rng.random() < finish else "length", total_seconds=rng.uniform(*total),
        first_token_seconds=rng.uniform(*first))
    if status == 1:
        e.confidence.mean_entropy = rng.gauss(entropy, 0.2)
        e.confidence.mean_logprob = rng.gauss(logprob, 0.2)
        e.confidence.min_top1_prob = rng.uniform(*top1)
        e.completion_token_hashes.extend(tokens if tokens is not None else [rng.randrange(2000) for _ in range(24)])
    e.time.GetCurrentTime()
    return e


def classify(i: int, rng: random.Random, version="v1", *, confidence=0.8, accuracy=0.8):
    """A Classify event and its Feedback: the model gives its top label `confidence`; the
    true label is that one with probability `accuracy`."""
    e = events_pb2.InferenceEvent(event_id=f"c{i}-{rng.random()}", request_id=f"c{rng.random()}", method="Classify",
                                  version=version, route=events_pb2.ROUTE_STABLE, status=1, prompt_tokens=10,
                                  total_seconds=0.05, first_token_seconds=0.01)
    top = rng.choice(["yes", "no"])
    e.label_probabilities.update({top: confidence, ("no" if top == "yes" else "yes"): 1 - confidence})
    e.time.GetCurrentTime()
    truth = top if rng.random() < accuracy else ("no" if top == "yes" else "yes")
    f = events_pb2.FeedbackEvent(event_id="f" + e.event_id, feedback_id="f" + e.event_id, request_id=e.request_id,
                                 version=version, label=truth)
    f.time.GetCurrentTime()
    return [e, f]


def scored(i: int, rng: random.Random, version="v1", *, mean=0.8):
    """An answer and a Feedback score for it (a rating from 0 to 1)."""
    e = inference(i, rng, version)
    f = events_pb2.FeedbackEvent(event_id="s" + e.event_id, feedback_id="s" + e.event_id, request_id=e.request_id,
                                 version=version, score=min(1.0, max(0.0, rng.gauss(mean, 0.1))))
    f.time.GetCurrentTime()
    return [e, f]


def plain(**shift):
    return lambda i, rng, v: [inference(i, rng, v, **shift)]


def candidate(**shift):
    """A stable v1 and a canary v2 taking turns; `shift` changes v2 only."""
    def make(i, rng, v):
        if v == "v1":
            return [inference(i, rng, "v1")]
        return [inference(i, rng, "v2", route=events_pb2.ROUTE_CANARY, **shift)]
    return make


SCENARIOS = [
    Scenario("PromptLengthDrift", plain(), plain(prompt=(200, 400))),
    Scenario("CompletionLengthDrift", plain(), plain(completion=200)),
    Scenario("MeanLogprobDrift", plain(), plain(logprob=-3.0)),
    Scenario("EntropyDrift", plain(), plain(entropy=4.0)),
    Scenario("TopProbabilityDrift", plain(), plain(top1=(0.01, 0.1))),
    Scenario("LatencyDrift", plain(), plain(total=(1.0, 1.5))),
    Scenario("FirstTokenTimeDrift", plain(), plain(first=(0.3, 0.5))),
    Scenario("FinishReasonDrift", plain(), plain(finish=0.1)),
    Scenario("CandidateDriftsFromStable", candidate(), candidate(entropy=4.0), ("v1", "v2")),
    Scenario("CandidateFinishReasonsDifferFromStable", candidate(), candidate(finish=0.1), ("v1", "v2")),
    Scenario("ConceptDrift", lambda i, rng, v: classify(i, rng, v, confidence=0.9, accuracy=0.9),
             lambda i, rng, v: classify(i, rng, v, confidence=0.9, accuracy=0.1)),
    Scenario("RepetitiveCompletions", plain(), plain(tokens=[7] * 24)),
    Scenario("FeedbackScoreShift", scored, lambda i, rng, v: scored(i, rng, v, mean=0.3)),
    Scenario("HighCalibrationError", lambda i, rng, v: classify(i, rng, v, confidence=0.8, accuracy=0.8),
             lambda i, rng, v: classify(i, rng, v, confidence=0.99, accuracy=0.5)),
    Scenario("HighErrorRate", plain(), lambda i, rng, v: [inference(i, rng, v, status=1 if rng.random() < 0.5 else 7)]),
    Scenario("ErrorRateIncrease", plain(),
             lambda i, rng, v: [inference(i, rng, v, status=1 if rng.random() < 0.5 else 7)]),
    Scenario("HighP99Latency", plain(), plain(total=(12.0, 20.0))),
]
BY_RULE = {s.rule: s for s in SCENARIOS}


class Traffic:
    def __init__(self, producer: AIOKafkaProducer):
        self.producer = producer
        self.n = 0

    async def send(self, sc: Scenario, make, count: int, rng: random.Random) -> None:
        futures = []
        for _ in range(count):
            for v in sc.versions:
                self.n += 1
                for m in make(self.n, rng, v):
                    m.model = sc.model
                    topic = topics.INFERENCE if isinstance(m, events_pb2.InferenceEvent) else topics.FEEDBACK
                    headers = cloudevents.headers(m.event_id, m.DESCRIPTOR.full_name, "scenario", time.time(),
                                                  codec.PROTOBUF)
                    futures.append(await self.producer.send(topic, codec.encode(m, codec.PROTOBUF),
                                                            key=sc.model.encode(), headers=headers))
        await asyncio.gather(*futures)


async def play(sc: Scenario, traffic: Traffic, hook: Receiver) -> None:
    """Normal traffic, then traffic that should set the rule off until its alert fires, then
    normal traffic until it resolves; what the receiver saw goes in ``sc.result``."""
    rng = random.Random(sc.rule)
    await traffic.send(sc, sc.good, 400, rng)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # normal traffic for longer than any rule's `for`
        await traffic.send(sc, sc.good, 50, rng)
        await hook.wait(0.25)
    sc.result["bad_from"] = time.monotonic()
    for phase, make, done in (("fire", sc.bad, hook.fired), ("resolve", sc.good, hook.resolved)):
        t0 = time.monotonic()
        while not done(sc.rule, sc.model):
            if time.monotonic() - t0 > DEADLINE:
                sc.result["timed_out"] = phase
                return
            await traffic.send(sc, make, 50, rng)
            await hook.wait(0.25)
        sc.result[phase] = round(time.monotonic() - t0, 1)


async def run_scenarios(bootstrap: str, folder: Path) -> Receiver:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner, port = await listen(app, "127.0.0.1", 0, "the webhook receiver")
    (folder / "config.yml").write_text(CONFIG.format(url=f"http://127.0.0.1:{port}/hook"))
    (folder / "secret").write_bytes(SECRET)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await topics.ensure_topics(admin, topics.ALL, topics.TopicOptions())
    await admin.close()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "vigil.cli"]
    logs = {name: folder / f"{name}.log" for name in ("process", "alerting")}
    procs = {
        "process": subprocess.Popen(cmd + ["process", "--bootstrap-servers", bootstrap, "--group-id", "scenarios",
                                           "--metrics-port", "0", "--session-timeout-ms", "6000", *PROCESSOR],
                                    stdout=logs["process"].open("w"), stderr=subprocess.STDOUT, env=env),
        "alerting": subprocess.Popen(cmd + ["alerting", "--bootstrap-servers", bootstrap, "--rules",
                                            str(scenario_rules(folder)), "--config", str(folder / "config.yml"),
                                            "--admin-port", "0", "--webhook-secret-file", str(folder / "secret")],
                                     stdout=logs["alerting"].open("w"), stderr=subprocess.STDOUT, env=env),
    }
    try:
        await asyncio.to_thread(log_match, logs["alerting"], "admin and metrics on", procs["alerting"], 120)
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all", linger_ms=5)
        await producer.start()
        try:
            traffic = Traffic(producer)
            await asyncio.gather(*(play(sc, traffic, hook) for sc in SCENARIOS))
            # traffic sent before a resolution may still be on its way: wait until it has
            # all been judged (a change detector may see the return to normal as a change)
            t0 = time.monotonic()
            while not all(hook.resolved(sc.rule, sc.model) for sc in SCENARIOS) and time.monotonic() - t0 < 60:
                await hook.wait(0.5)
        finally:
            await producer.stop()
    finally:
        for p in procs.values():
            p.terminate()
        for name, p in procs.items():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        await runner.cleanup()
    hook.logs = {name: path.read_text() for name, path in logs.items()}
    return hook


@pytest.fixture(scope="module")
def played(tmp_path_factory) -> Receiver:
    with EmbeddedBroker() as broker:
        return asyncio.run(run_scenarios(broker.bootstrap_servers, tmp_path_factory.mktemp("scenarios")))


def test_every_default_rule_has_a_scenario():
    assert sorted(default_rule_names()) == sorted(BY_RULE)


@pytest.mark.parametrize("rule", [s.rule for s in SCENARIOS])
def test_the_rule_fires_and_resolves_as_one_alert(played, rule):
    sc = BY_RULE[rule]
    seen = played.of(rule, sc.model)
    assert "timed_out" not in sc.result, (sc.result, seen[-3:], played.logs["process"][-2000:])
    assert seen and min(a["received"] for a in seen) > sc.result["bad_from"], "fired on normal traffic"
    assert played.bad_signatures == 0
    # one series is one alert: a fingerprint per (version, feature), firing first, resolved last
    series: dict[tuple, set] = {}
    for a in seen:
        series.setdefault((a["labels"]["version"], a["labels"]["feature"]), set()).add(a["fingerprint"])
    assert all(len(fps) == 1 for fps in series.values()), series
    by_fp: dict[str, list] = {}
    for a in seen:
        by_fp.setdefault(a["fingerprint"], []).append(a["status"])
    assert all(s[0] == "firing" and s[-1] == "resolved" for s in by_fp.values()), by_fp

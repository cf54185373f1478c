"""The page on the real loop, in Debian's headless Chromium: `vigil process`, `vigil
alerting` (the shipped CandidateDriftsFromStable rule, its `for` shortened), `vigil
rollout` and `vigil ui` as the processes `vigil up` starts, on the embedded broker. A
canary of version 2 runs beside stable version 1 (their events written onto
vigil.inference.events as the servers write them); the operator pauses and resumes it from
the page (through the real controller); then version 2 drifts. The page shows the drift
against stable, the alert, and the rollback with the controller's own reason. Screenshots
of each stage are kept in the test's tmp folder (printed at the end)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from aiokafka import AIOKafkaProducer
from selenium.webdriver.common.by import By

from eventbus import cloudevents, codec, topics
from eventbus.broker import free_port
from protos import events_pb2
from tests.helpers import ROOT
from tests.helpers.browser import wait
from tests.helpers.messages import ensure_topics
from tests.helpers.processes import log_match
from tests.helpers.waiting import wait_until

PROCESSOR = ["--signal-every", "20", "--ks-window", "100", "--compare-every", "5", "--compare-min", "10",
             "--compare-window", "60"]
CANARY = {"steps": [10, 25, 50, 100], "interval": 1.0, "min_requests": 200, "inconclusive_limit": 600,
          "thresholds": {"min_samples": 10}}


def start(name: str, args: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    log = folder / f"{name}.log"
    proc = subprocess.Popen([sys.executable, "-m", "vigil.cli", *args], cwd=ROOT, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log


def call(url: str, op: str, **kw):
    req = urllib.request.Request(f"{url}/api/{op}", data=json.dumps(kw).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def leader(url: str):
    try:
        return call(url, "list_models") is not None
    except urllib.error.HTTPError as e:
        if e.code == 503:  # a standby until the lease is ours
            return False
        raise
    except urllib.error.URLError:  # not listening yet
        return False


class Feed:
    """Stable (1) and canary (2) events of the model, as the servers write them, a batch
    every 0.2 s; `drift` makes version 2's answers far less certain."""

    def __init__(self, bootstrap: str, model: str):
        self.bootstrap, self.model = bootstrap, model
        self.drift = False
        self.stopping = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=lambda: asyncio.run(self.run()), daemon=True)
        self.thread.start()

    def event(self, version: str, i: int) -> events_pb2.InferenceEvent:
        """The same answers of both versions, but for the drift: values that wobble in a
        short cycle with no trend, so that no detector and no check of the controller sees a
        change before the drift (random ones made its trend test fail a canary now and then)."""
        bad = version == "2" and self.drift
        wobble = (i % 5 - 2) / 100
        e = events_pb2.InferenceEvent(
            event_id=str(uuid.uuid4()), request_id=str(uuid.uuid4()), method="Generate", model=self.model,
            version=version, route=events_pb2.ROUTE_STABLE if version == "1" else events_pb2.ROUTE_CANARY,
            status=events_pb2.STATUS_OK, prompt_tokens=30 + i % 5, completion_tokens=24, finish_reason="stop",
            total_seconds=0.3 + wobble, first_token_seconds=0.03 + wobble / 10)
        e.confidence.mean_entropy = (4.0 if bad else 2.0) + wobble
        e.confidence.mean_logprob = (-3.0 if bad else -1.0) + wobble
        e.confidence.min_top1_prob = 0.6 + wobble
        e.completion_token_hashes.extend((i * 7 + k) % 2000 for k in range(24))
        e.time.GetCurrentTime()
        return e

    async def run(self) -> None:
        n = 0
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            while not self.stopping.is_set():
                futures = []
                for _ in range(5):
                    n += 1
                    for version in ("1", "2"):
                        e = self.event(version, n)
                        headers = cloudevents.headers(e.event_id, e.DESCRIPTOR.full_name, "test", time.time(),
                                                      codec.PROTOBUF)
                        futures.append(await producer.send(topics.INFERENCE, codec.encode(e), key=self.model.encode(),
                                                           headers=headers))
                await asyncio.gather(*futures)
                self.sent += len(futures)
                await asyncio.sleep(0.2)  # the feed's pace, not a wait for an effect
        finally:
            await producer.stop()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


@pytest.fixture
def loop(kafka_broker, tmp_path):
    bootstrap = kafka_broker.bootstrap_servers
    asyncio.run(ensure_topics(bootstrap))
    doc = yaml.safe_load((ROOT / "alerting" / "default_rules.yml").read_text())
    rules = [dict(r, **{"for": "1s"}) for g in doc["groups"] for r in g["rules"]
             if r["alert"] == "CandidateDriftsFromStable"]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "rollout", "rules": rules}]}))
    (tmp_path / "alerting.yml").write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
    tag = uuid.uuid4().hex[:6]
    rollout_port, alerting_port = free_port(), free_port()
    rollout_url, alerting_url = f"http://127.0.0.1:{rollout_port}", f"http://127.0.0.1:{alerting_port}"
    began = time.monotonic()
    procs = {  # all at once: each start-up is mostly imports
        "process": start("process", ["process", "--bootstrap-servers", bootstrap, "--group-id", f"page-{tag}",
                                     "--metrics-port", "0", "--session-timeout-ms", "6000", *PROCESSOR], tmp_path),
        "alerting": start("alerting", ["alerting", "--bootstrap-servers", bootstrap, "--rules",
                                       str(tmp_path / "rules.yml"), "--config", str(tmp_path / "alerting.yml"),
                                       "--admin-port", str(alerting_port), "--instance", f"page-{tag}"], tmp_path),
        "rollout": start("rollout", ["rollout", "--bootstrap-servers", bootstrap, "--admin-port", str(rollout_port),
                                     "--group-id", f"page-{tag}", "--tick", "0.25", "--outbox-dir", str(tmp_path / "outbox"),
                                     # one leader throughout on a busy machine: no rebalance of the lease
                                     "--session-timeout-ms", "30000"], tmp_path),
        "ui": start("ui", ["ui", "--bootstrap-servers", bootstrap, "--port", "0", "--rollout-url", rollout_url,
                           "--alerting-url", alerting_url], tmp_path),
    }
    try:
        ui = log_match(procs["ui"][1], r"vigil ui: (http://\S+/)", procs["ui"][0], 150)[1]
        log_match(procs["alerting"][1], "admin and metrics on", procs["alerting"][0], 150)
        log_match(procs["process"][1], r"vigil process", procs["process"][0], 150)
        wait_until(lambda: leader(rollout_url), 150, "the controller to hold the lease")
        print(f"\nthe loop's processes ready in {time.monotonic() - began:.1f} s")
        yield {"ui": ui, "rollout": rollout_url, "bootstrap": bootstrap, "logs": tmp_path}
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def model_box(driver, model: str):
    for box in driver.find_elements(By.CSS_SELECTOR, "#models .model"):
        if box.find_element(By.TAG_NAME, "h3").text == model:
            return box
    return None


def phase(driver, model: str) -> str:
    box = model_box(driver, model)
    return box.find_element(By.CSS_SELECTOR, ".phase .badge").text if box else ""


def click(driver, model: str, action: str) -> bool:
    box = model_box(driver, model)
    if box is None:
        return False
    box.find_element(By.CSS_SELECTOR, f"button[data-action='{action}']").click()
    return True


def test_the_page_follows_a_drifting_canary_to_its_rollback(loop, browser, tmp_path):
    model = f"live-{uuid.uuid4().hex[:6]}"
    shots = []

    def shot(name: str) -> None:
        browser.execute_script("window.scrollTo(0, 0)")
        path = tmp_path / f"{len(shots) + 1}-{name}.png"
        assert browser.save_screenshot(str(path))
        shots.append(path)

    browser.get(loop["ui"])
    wait(browser, lambda d: d.find_element(By.ID, "connection").text == "live", "the stream connected")
    feed = Feed(loop["bootstrap"], model)
    try:
        call(loop["rollout"], "start", model=model, candidate="2", stable="1", **CANARY)
        wait(browser, lambda d: phase(d, model) == "canary", "the canary")

        # the operator's actions, through the page's server to the controller
        wait(browser, lambda d: click(d, model, "pause"), "the pause button")
        wait(browser, lambda d: phase(d, model) == "paused", "the rollout paused from the page")
        wait(browser, lambda d: "paused from the page" in model_box(d, model).find_element(By.CSS_SELECTOR,
                                                                                      "p.reason").text,
             "the reason of the pause", 30)
        assert call(loop["rollout"], "status", model=model)["phase"] == "paused"
        shot("paused")
        wait(browser, lambda d: click(d, model, "resume"), "the resume button")
        wait(browser, lambda d: phase(d, model) == "canary", "the rollout resumed from the page")
        wait(browser, lambda d: any(r.startswith(f"{model} 2 ") for r in
                                    [e.text for e in d.find_elements(By.CSS_SELECTOR, "#traffic tr.version")]),
             "the canary's request figures")

        feed.drift = True
        wait(browser, lambda d: [f for f in d.find_elements(By.CSS_SELECTOR, "#candidate-charts figure[data-drifted='true']")
                                 if f"{model}/2 ks_vs_stable" in f.text], "the canary's drift against stable", 90)
        shot("drift")
        rows = wait(browser, lambda d: [r.text for r in d.find_elements(By.CSS_SELECTOR, "tr.alert")
                                        if f"model={model}" in r.text and "CandidateDriftsFromStable" in r.text],
                    "the alert", 90)
        assert "version=2" in rows[0]
        wait(browser, lambda d: phase(d, model) == "rolled_back", "the rollback", 90)
        decided = call(loop["rollout"], "status", model=model)
        assert decided["phase"] == "rolled_back" and decided["reason"]
        # the page redraws as records come: read it through wait, which reads again past a stale element
        wait(browser, lambda d: model_box(d, model).find_element(By.CSS_SELECTOR, "p.reason").text
             == decided["reason"], "the controller's reason", 30)
        shot("rolled-back")
        wait(browser, lambda d: "100.0 %" in model_box(d, model).text, "all traffic back on stable", 30)
    finally:
        feed.stop()
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    print(f"\nscreenshots: {', '.join(str(p) for p in shots)}\nrollback: {decided['reason']}")

"""The rollout controller's admin API against a real `vigil rollout` process on the
embedded broker: a request it refuses answers 400 naming the field and changes nothing
(no model registered, no record on vigil.rollout); no body, however odd, gets a 500; the
controller keeps deciding afterwards. Then a fuzz of the API with hypothesis, and the
supervised tick: a failing tick is logged, counted, shown on /healthz, and restarted."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventbus import topics
from rollout.api import OPS
from tests.helpers.kafka import read_topic
from tests.helpers.rollout import ServiceThread
from tests.helpers.waiting import wait_until

VIGIL = [sys.executable, "-m", "vigil.cli"]


class Admin:
    """HTTP to the admin API, any method, path and body; answers (status, parsed JSON or text)."""

    def __init__(self, port: int):
        self.port = port

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")

    def post(self, op: str, body) -> tuple[int, object]:
        return self.send("POST", f"/api/{op}", json.dumps(body).encode(), {"Content-Type": "application/json"})

    def metric(self, name: str, labels: str = "") -> float | None:
        _, text = self.send("GET", "/metrics")
        m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else None


@pytest.fixture(scope="module")
def rollout_process(kafka_broker, tmp_path_factory):
    """`vigil rollout` as a process, leader of its own group; its output in a file."""
    tmp = tmp_path_factory.mktemp("rollout")
    out = tmp / "rollout.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([*VIGIL, "rollout", "--bootstrap-servers", kafka_broker.bootstrap_servers,
                                 "--admin-port", "0", "--group-id", f"hardening-{uuid.uuid4().hex[:8]}",
                                 "--tick", "0.2", "--outbox-dir", str(tmp / "outbox")],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        port = int(wait_until(lambda: re.search(r"admin API on http://127.0.0.1:(\d+)", out.read_text()), 60,
                        "the admin API's address").group(1))
        admin = Admin(port)
        wait_until(lambda: admin.send("GET", "/healthz")[1].get("leader"), 60, "the lease")
        admin.log = out
        admin.proc = proc
        yield admin
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def decisions(bootstrap: str, model: str, count: int, timeout: float = 30.0) -> list:
    from protos import events_pb2
    found = read_topic(bootstrap, topics.ROLLOUT, lambda r: r.key() == model.encode(), count, timeout)
    return [events_pb2.RolloutState.FromString(r.value()) for r in found]


def test_a_refused_start_changes_nothing_and_the_controller_goes_on(rollout_process, kafka_broker):
    admin, bootstrap = rollout_process, kafka_broker.bootstrap_servers
    refused = [({"model": "M", "stable": "1", "candidate": 3}, "candidate"),
               ({"model": "ghost", "stable": "1", "candidate": "2", "steps": "abc"}, "steps"),
               ({"model": ["M"], "stable": "1", "candidate": "2"}, "model"),
               ({"model": "M", "stable": "1", "candidate": "2", "steps": [5, "x"]}, "steps[1]"),
               ({"model": "M", "stable": "1", "candidate": "2", "interval": True}, "interval"),
               ({"model": "M", "stable": "1", "candidate": "2", "thresholds": {"alpha": "big"}}, "thresholds.alpha"),
               ({"model": "M", "stable": "1", "candidate": "1"}, "candidate"),
               ({"model": "M", "stable": "1", "candidate": "\ud800"}, "candidate"),
               ({"model": "M", "stable": "1", "candidate": "2", "colour": "red"}, "colour")]
    for body, field in refused:
        status, answer = admin.post("start", body)
        assert status == 400 and answer["field"] == field, (body, status, answer)
        assert answer["error"].startswith(f"{field}: "), answer
    for model in ("M", "ghost"):
        status, answer = admin.post("status", {"model": model})
        assert status == 400 and "unknown model" in answer["error"], (model, answer)

    # the controller still takes commands and its tick still decides
    status, answer = admin.post("start", {"model": "M", "stable": "1", "candidate": "2", "interval": 0.2,
                                          "min_requests": 5})
    assert status == 200 and answer["candidate"] == "2", answer
    started = answer["generation"]
    wait_until(lambda: admin.post("status", {"model": "M"})[1]["generation"] > started, 30, "an analysis by the tick")
    assert "candidate served 0 of 5 requests" in admin.post("status", {"model": "M"})[1]["reason"]
    status, health = admin.send("GET", "/healthz")
    assert status == 200 and health["ready"] and health["leader"], health

    # vigil.rollout holds M's good records only, and nothing of ghost; M's records come after the
    # refused requests in the publisher's order, so once they are there the others would be too
    records = decisions(bootstrap, "M", started + 1)
    assert len(records) >= started + 1 and {r.candidate_version for r in records} <= {"", "2"}
    assert decisions(bootstrap, "ghost", 1, timeout=1.0) == []


@pytest.mark.parametrize("body, field", [
    (b"[" * 100_000 + b"]" * 100_000, "body"),
    (b'{"model": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
    (b"{not json", "body"),
    (b"\xff\xfe\x00garbage", "body"),
    (b"[1, 2]", "body"),
    (b'{"model": "M", "candidate": NaN}', "body"),
    (b'{"model": 1e999}', "body"),
])
def test_odd_bodies_answer_400_naming_what_is_wrong(rollout_process, body, field):
    status, answer = rollout_process.send("POST", "/api/start", body, {"Content-Type": "application/json"})
    assert status == 400 and answer["field"] == field and answer["error"].startswith(f"{field}: "), answer


def test_a_body_with_a_bogus_charset_is_read_as_utf8(rollout_process):
    status, answer = rollout_process.send("POST", "/api/status", json.dumps({"model": "nobody"}).encode(),
                                          {"Content-Type": "application/json; charset=no-such-charset"})
    assert status == 400 and answer["field"] == "model" and "unknown model" in answer["error"], answer


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20)
FIELDS = ("model", "candidate", "stable", "strategy", "steps", "min_requests", "interval", "inconclusive_limit",
          "failure_limit", "keep_old_for", "thresholds", "versions", "flag", "name", "reason")
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12) \
    | st.sampled_from(["M", "1", "2", "canary", "shadow", "bluegreen"])
PLAUSIBLE = st.fixed_dictionaries({}, optional={f: SCALARS | JSON for f in FIELDS}) | st.fixed_dictionaries(
    {"model": st.sampled_from(["F", "M"]), "stable": st.just("1"), "candidate": st.sampled_from(["2", "3"])},
    optional={"steps": st.lists(SCALARS, max_size=5), "thresholds": st.dictionaries(
        st.sampled_from(["alpha", "min_samples", "weights", "pass_score", "nope"]), SCALARS | JSON, max_size=3),
        "strategy": SCALARS, "interval": SCALARS, "min_requests": SCALARS})
FLAGS = st.fixed_dictionaries({"model": st.just("F"), "flag": st.fixed_dictionaries({}, optional={
    "name": SCALARS, "percentage": SCALARS, "enabled": SCALARS,
    "rules": st.lists(st.fixed_dictionaries({}, optional={"attribute": SCALARS, "op": st.sampled_from(
        ["eq", "in", "matches", "gt", "exists", "bad"]) | SCALARS, "value": SCALARS | JSON}), max_size=3) | JSON})})
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
OP = st.sampled_from([*OPS, "nope", "", "..", "start/x"]) | st.text(max_size=10)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=METHODS, op=OP, body=st.one_of(PLAUSIBLE.map(json.dumps), FLAGS.map(json.dumps),
                                             JSON.map(json.dumps), st.binary(max_size=64)).map(
    lambda b: b if isinstance(b, bytes) else b.encode()))
def test_fuzzed_requests_never_get_a_500(rollout_process, method, op, body):
    from urllib.parse import quote
    status, answer = rollout_process.send(method, "/api/" + quote(op), body, {"Content-Type": "application/json"})
    assert status < 500, (method, op, body, status, answer)


def test_after_the_fuzz_the_controller_is_well(rollout_process):
    admin = rollout_process
    status, answer = admin.post("register", {"model": "after-fuzz", "versions": ["1"]})
    assert status == 200, answer
    status, health = admin.send("GET", "/healthz")
    assert status == 200 and health["ready"], health
    assert "Traceback" not in admin.log.read_text()


def test_a_failing_tick_is_logged_counted_shown_and_restarted(kafka_broker, tmp_path, caplog):
    """The fault is injected where the tick calls the controller (RolloutService._tick calls
    self.controller.tick()): it raises until the test has seen the task down."""
    import logging
    import threading

    s = ServiceThread(kafka_broker.bootstrap_servers, f"tick-{uuid.uuid4().hex[:8]}", tmp_path, "ticker")
    try:
        admin = Admin(s.service.admin_port)
        wait_until(lambda: admin.send("GET", "/healthz")[1].get("leader"), 60, "the lease")
        status, d = admin.post("start", {"model": "T", "stable": "1", "candidate": "2", "interval": 0.2})
        assert status == 200, d
        generation = lambda: admin.post("status", {"model": "T"})[1]["generation"]  # noqa: E731
        controller, broken = s.service.controller, threading.Event()
        tick = controller.tick

        def faulty_tick():
            if broken.is_set():
                raise RuntimeError("injected tick fault")
            return tick()

        controller.tick = faulty_tick
        failures = lambda: admin.metric("vigil_task_failures_total", '{task="rollout-tick"}')  # noqa: E731
        assert failures() == 0
        with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
            broken.set()
            status, health = wait_until(lambda: (r := admin.send("GET", "/healthz"))[0] == 503 and r, 30, "not ready")
            assert health["down"] == ["rollout-tick"] and not health["ready"] and health["leader"], health
            assert failures() >= 1 and admin.metric("vigil_task_up", '{task="rollout-tick"}') == 0
            broken.clear()
            wait_until(lambda: admin.send("GET", "/healthz")[0] == 200, 60, "ready again")
        assert any("task rollout-tick failed" in r.getMessage() and r.exc_info for r in caplog.records)
        assert "injected tick fault" in caplog.text
        seen = generation()
        wait_until(lambda: generation() > seen, 30, "a decision by the restarted tick")
    finally:
        s.stop()

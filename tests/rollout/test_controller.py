"""The rollout controller on simulated traffic with a manual clock: canary, blue/green and
shadow paths, rollback on errors, latency, drift and alerts, low traffic that pauses and
never rolls back, undo and history, and a restart that resumes where it was."""

from __future__ import annotations

import json
import math
import random

import pytest

from protos import events_pb2 as pb
from rollout import (FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, AlertObs, Controller, ManualClock,
                     RolloutConfig, RolloutError, SignalObs, wire)
from stream_processors.processor import PartitionState, Settings
from stream_processors.runner import signal_message

M = "demo"
FAST = dict(interval=30.0, min_requests=50)
# the processors' comparisons of candidate and stable: every 25 candidate events, over the latest 300
PROCESSOR = Settings(compare_every=25, compare_min=20, compare_window=300)
ROUTES = {"stable": pb.ROUTE_STABLE, "canary": pb.ROUTE_CANARY, "shadow": pb.ROUTE_SHADOW}


def good(rng):
    return rng.random() < 0.01, rng.lognormvariate(math.log(0.2), 0.3), rng.gauss(-1.0, 0.3)


def erring(rng):
    return rng.random() < 0.12, rng.lognormvariate(math.log(0.2), 0.3), rng.gauss(-1.0, 0.3)


def slow(rng):
    return rng.random() < 0.01, rng.lognormvariate(math.log(0.3), 0.3), rng.gauss(-1.0, 0.3)


class Sim:
    """Traffic at `rps` requests a second split by the controller's weights, copies to
    shadow versions, as InferenceEvents (and, with `accuracy`, Classify feedback) through
    the stream processor's computation; its signals, as they travel on vigil.signals, are
    what the controller observes. The controller is ticked every second; the processor
    takes the events every `flush` seconds."""

    def __init__(self, candidate=good, stable=good, *, defaults=None, seed=0, accuracy=None, flush=5):
        self.clock = ManualClock()
        self.ctl = Controller(self.clock, defaults or RolloutConfig(**FAST))
        self.processor = PartitionState(0, PROCESSOR)
        self.behave = {"v1": stable, "v2": candidate}
        self.accuracy = accuracy or {}   # version -> share of right answers (with feedback)
        self.rng = random.Random(seed)
        self.decisions = []
        self.ctl.register(M, "v1", "v2")
        self.drift = {}  # version -> (feature, drifted): a drift signal every 10 s
        self.events, self.feedback, self.flush, self.n = [], [], flush, 0

    def state(self):
        return self.ctl.models[M]

    def run(self, seconds, rps=20.0, until=None):
        for _ in range(int(seconds)):
            m = self.state()
            n = int(rps) + (self.rng.random() < rps - int(rps))
            for _ in range(n):
                point, acc = self.rng.random(), 0.0
                version = max(m.weights, key=m.weights.get)
                for v, w in m.weights.items():
                    acc += w
                    if point < acc and w > 0:
                        version = v
                        break
                self.outcome(version, "canary" if version == m.candidate else "stable")
                for v in m.shadow:
                    self.outcome(v, "shadow")
            if int(self.clock.now()) % 10 == 0:
                for v, (feature, drifted) in self.drift.items():
                    self.decisions += self.ctl.observe(SignalObs(M, v, self.clock.now(), "ks", feature, drifted, 0.4))
            self.clock.advance(1.0)
            if int(self.clock.now()) % self.flush == 0:
                self.process()
            self.decisions += self.ctl.tick()
            if until and until(self.state()):
                break
        self.process()
        return self

    def outcome(self, version, route):
        err, lat, conf = self.behave[version](self.rng)
        self.n += 1
        e = pb.InferenceEvent(event_id=f"e{self.n}", request_id=f"r{self.n}", model=M, version=version,
                              route=ROUTES[route], method="Generate", status=pb.STATUS_INTERNAL if err else pb.STATUS_OK,
                              prompt_tokens=20, completion_tokens=10, finish_reason="error" if err else "stop",
                              first_token_seconds=0.05, total_seconds=0.05 + 9 * lat)
        e.confidence.mean_logprob = conf
        e.time.FromNanoseconds(int(self.clock.now() * 1e9))
        if version in self.accuracy:
            e.method = "Classify"
            e.label_probabilities.update({"yes": 0.9, "no": 0.1})
            f = pb.FeedbackEvent(event_id=f"f{self.n}", request_id=e.request_id, model=M, version=version,
                                 label="yes" if self.rng.random() < self.accuracy[version] else "no")
            f.time.CopyFrom(e.time)
            self.feedback.append(f)
        self.events.append(e)

    def process(self):
        out = []
        self.processor.apply_events(self.events, out)
        self.processor.apply_feedback(self.feedback, out)
        self.events, self.feedback = [], []
        for o in out:
            sig = pb.Signal.FromString(signal_message(o, "sim").SerializeToString())
            self.decisions += self.ctl.observe(wire.signal(sig))

    def phases(self):
        return [d.phase for d in self.decisions]


def ended(m):
    return m.phase not in (PROGRESSING, PAUSED)


def test_good_canary_promotes_through_every_step():
    s = Sim(good)
    s.decisions.append(s.ctl.start(M, "v2"))
    s.run(3600, until=ended)
    steps = [d.weights.get("v2") for d in s.decisions if "step" in d.reason and d.phase == PROGRESSING]
    assert [w for w in dict.fromkeys(steps)] == [0.05, 0.10, 0.25, 0.50, 1.0]
    last = s.decisions[-1]
    assert last.phase == PROMOTED and last.stable == "v2" and last.weights == {"v2": 1.0}
    assert ROLLED_BACK not in s.phases()
    assert [h["action"] for h in s.ctl.history(M)] == ["promoted"]


@pytest.mark.parametrize("behaviour, check, figure", [
    (erring, "error_rate", "candidate"),
    (slow, "latency", "ratio"),
])
def test_bad_candidate_rolls_back_naming_the_check_and_figures(behaviour, check, figure):
    s = Sim(behaviour)
    s.ctl.start(M, "v2")
    s.run(3600, until=ended)
    last = s.decisions[-1]
    assert last.phase == ROLLED_BACK and last.weights == {"v1": 1.0} and last.candidate == ""
    assert f"failed on {check}" in last.reason, last.reason
    c = last.figures["checks"][check]
    assert c["verdict"] == "fail" and figure in c
    assert sum(d.phase == ROLLED_BACK for d in s.decisions) == 1  # one decision
    h = s.ctl.history(M)[-1]
    assert h["action"] == "rolled_back" and h["from"] == "v2" and h["to"] == "v1" and check in h["reason"]


def test_candidate_drift_rolls_back_but_shared_drift_does_not():
    s = Sim(good)
    s.drift = {"v2": ("mean_entropy", True), "v1": ("mean_entropy", False)}
    s.ctl.start(M, "v2")
    s.run(3600, until=ended)
    last = s.decisions[-1]
    assert last.phase == ROLLED_BACK and "drift" in last.reason and "ks/mean_entropy" in last.reason
    assert last.figures["checks"]["drift"]["drifted"] == {"ks/mean_entropy": 0.4}

    both = Sim(good)
    both.drift = {"v2": ("mean_entropy", True), "v1": ("mean_entropy", True)}
    both.ctl.start(M, "v2")
    both.run(3600, until=ended)
    assert both.decisions[-1].phase == PROMOTED


def test_firing_alert_with_the_rollout_labels_fails_the_step_at_once():
    s = Sim(good)
    s.ctl.start(M, "v2")
    s.run(100)
    t = s.clock.now()
    assert s.ctl.observe(AlertObs("a", "LatencyDrift", "firing", {"model": M, "version": "v1"}, t)) == []
    assert s.ctl.observe(AlertObs("b", "LatencyDrift", "firing", {"model": "other", "version": "v2"}, t)) == []
    out = s.ctl.observe(AlertObs("c", "EntropyDrift", "firing", {"model": M, "version": "v2", "severity": "warning"}, t))
    assert len(out) == 1 and out[0].phase == ROLLED_BACK and out[0].weights == {"v1": 1.0}
    assert "alert EntropyDrift" in out[0].reason and out[0].figures["alert"] == "EntropyDrift"


def test_low_traffic_is_inconclusive_and_pauses_never_rolls_back():
    s = Sim(good, defaults=RolloutConfig())  # default settings: 50 requests, 60 s, limit 5
    s.ctl.start(M, "v2")
    s.run(4 * 3600, rps=1.0)
    assert ROLLED_BACK not in s.phases() and FAILED not in s.phases()
    assert s.ctl.history(M) == []
    last = s.decisions[-1]
    assert last.phase == PAUSED and last.attention and "inconclusive 6 times" in last.reason
    assert last.weights == {"v1": 0.95, "v2": 0.05}
    assert all("inconclusive" in d.reason for d in s.decisions[1:])
    s.decisions = [s.ctl.resume(M)]  # the step's data so far still counts
    s.run(3600, rps=1.0, until=lambda m: m.step == 1)
    assert s.state().step == 1 and "step 0 (5% on v2) passed" in s.decisions[-1].reason


def test_failure_limit_tolerates_failed_analyses():
    s = Sim(erring, defaults=RolloutConfig(**FAST, failure_limit=1))
    s.ctl.start(M, "v2")
    s.run(3600, until=ended)
    fails = [d for d in s.decisions if "failed on" in d.reason]
    assert [d.phase for d in fails] == [PROGRESSING, ROLLED_BACK] and "(1/1 tolerated)" in fails[0].reason


def test_bluegreen_analyses_shadow_switches_at_once_and_keeps_the_old_version():
    s = Sim(good)
    first = s.ctl.start(M, "v2", strategy="bluegreen", keep_old_for=300)
    assert first.weights == {"v1": 1.0, "v2": 0.0} and first.shadow == ["v2"]
    s.run(3600, until=lambda m: m.step == 1 or ended(m))
    switch = s.decisions[-1]
    assert switch.weights == {"v1": 0.0, "v2": 1.0} and switch.shadow == [] and switch.phase == PROGRESSING
    s.run(3600, until=ended)
    last = s.decisions[-1]
    assert last.phase == PROMOTED and last.weights == {"v2": 1.0}
    assert last.time - switch.time >= 300  # the old version stayed loaded that long


def test_bluegreen_bad_shadow_fails_without_traffic_and_alert_after_switch_switches_back():
    bad = Sim(erring)
    bad.ctl.start(M, "v2", strategy="bluegreen")
    bad.run(3600, until=ended)
    assert bad.decisions[-1].phase == FAILED and bad.decisions[-1].weights == {"v1": 1.0}

    s = Sim(good)
    s.ctl.start(M, "v2", strategy="bluegreen", keep_old_for=600)
    s.run(3600, until=lambda m: m.step == 1)
    out = s.ctl.observe(AlertObs("x", "HighErrorRate", "firing", {"model": M, "version": "v2"}, s.clock.now()))
    assert out[0].phase == ROLLED_BACK and out[0].weights == {"v1": 1.0}


def test_shadow_only_never_moves_traffic():
    s = Sim(good)
    s.ctl.start(M, "v2", strategy="shadow")
    s.run(600)
    assert all(d.weights == {"v1": 1.0, "v2": 0.0} and d.shadow == ["v2"] for d in s.decisions)
    assert any("passed" in d.reason for d in s.decisions) and s.state().phase == PROGRESSING
    assert s.ctl.promote(M).weights == {"v2": 1.0}

    bad = Sim(slow)
    bad.ctl.start(M, "v2", strategy="shadow")
    bad.run(600, until=ended)
    assert bad.decisions[-1].phase == FAILED and "latency" in bad.decisions[-1].reason


def test_undo_and_history():
    clock = ManualClock()
    c = Controller(clock)
    c.register(M, "v1", "v2", "v3")
    c.start(M, "v2")
    clock.advance(5)
    c.promote(M)
    c.start(M, "v3", strategy="shadow")
    c.abort(M)
    c.start(M, "v3")
    assert c.promote(M).stable == "v3"
    assert c.undo(M).weights == {"v2": 1.0}
    assert c.undo(M).stable == "v1"
    with pytest.raises(RolloutError) as e:
        c.undo(M)
    assert e.value.field == "model"
    h = c.history(M)
    assert [(r["action"], r["from"], r["to"]) for r in h] == [
        ("promoted", "v1", "v2"), ("aborted", "v3", "v2"), ("promoted", "v2", "v3"),
        ("undo", "v3", "v2"), ("undo", "v2", "v1")]
    assert all(r["reason"] for r in h)


def test_restore_mid_rollout_resumes_identically():
    a = Sim(good, seed=3)
    a.ctl.start(M, "v2")
    a.run(200)  # mid step, with data in the windows
    assert a.state().step >= 1 and a.state().windows["v2"].sample > 0
    b = Sim(good, seed=3)
    b.ctl = Controller.restore(json.loads(json.dumps(a.ctl.snapshot())), b.clock, a.ctl.defaults)
    b.processor, b.n = PartitionState.decode(a.processor.encode(), PROCESSOR), a.n  # the processors go on
    b.clock.t, b.rng = a.clock.t, random.Random(7)
    a.rng, a.decisions, b.decisions = random.Random(7), [], []
    a.run(3600, until=ended)
    b.run(3600, until=ended)
    assert [d.to_dict() for d in a.decisions] == [d.to_dict() for d in b.decisions]
    assert a.decisions[-1].phase == PROMOTED


def test_resume_from_the_last_decision_record():
    a = Sim(good)
    a.decisions.append(a.ctl.start(M, "v2"))
    a.run(3600, until=lambda m: m.step == 2)
    records = [json.loads(json.dumps(d.to_dict())) for d in a.decisions]
    b = Sim(good)
    b.ctl = Controller.from_records(reversed(records), b.clock)
    b.clock.t, b.processor, b.n = a.clock.t, a.processor, a.n  # the processors go on
    last = a.decisions[-1]
    assert b.ctl.status(M)["step"] == 2 and b.ctl.status(M)["generation"] == last.generation
    b.decisions = []
    b.run(3600, until=ended)
    assert b.decisions[0].generation == last.generation + 1 and b.decisions[-1].phase == PROMOTED


@pytest.mark.parametrize("kwargs, field", [
    (dict(candidate="v9"), "candidate"),
    (dict(candidate="v1"), "candidate"),
    (dict(candidate="v2", steps=[10, 5]), "steps"),
    (dict(candidate="v2", steps=[5, 150]), "steps"),
    (dict(candidate="v2", steps=[0, 50]), "steps"),
    (dict(candidate="v2", interval=-1), "interval"),
    (dict(candidate="v2", keep_old_for=-5), "keep_old_for"),
    (dict(candidate="v2", min_requests=-1), "min_requests"),
    (dict(candidate="v2", strategy="linear"), "strategy"),
    (dict(candidate="v2", thresholds={"alpha": 2}), "thresholds.alpha"),
    (dict(candidate="v2", colour="red"), "colour"),
    (dict(candidate="v2", thresholds={"beta": 1}), "thresholds.beta"),
])
def test_validation_errors_name_the_field(kwargs, field):
    c = Controller(ManualClock())
    c.register(M, "v1", "v2")
    with pytest.raises(RolloutError) as e:
        c.start(M, **kwargs)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ")
    assert c.status(M)["phase"] == "stable"


def test_feedback_calibration_rolls_back_in_a_rollout():
    # both versions say "yes" with probability 0.9; feedback says the candidate is right half the time
    s = Sim(good, accuracy={"v1": 0.9, "v2": 0.5})
    s.ctl.start(M, "v2")
    s.run(3600, until=ended)
    last = s.decisions[-1]
    assert last.phase == ROLLED_BACK and "failed on calibration" in last.reason, last.reason
    cal = last.figures["checks"]["calibration"]
    assert cal["candidate_ece"] > 0.25 and cal["stable_ece"] < 0.1 and cal["candidate_accuracy"] < 0.7


def test_the_controller_reads_nothing_but_signals_and_alerts():
    # the step's sample is the candidate's events the processors compared since it began
    s = Sim(good)
    s.ctl.start(M, "v2")
    s.run(20)
    w = s.state().windows["v2"]
    assert w.sample == 0 and not w.readings   # 5% of 20 rps: no comparison of 25 events yet
    assert s.ctl.status(M)["window"] == {"requests": 0, "comparisons": []}
    s.run(11)  # the first analysis: one comparison, at the batch that crossed 25 candidate events
    n = s.state().windows["v2"].sample
    assert 25 <= n < 30 and f"candidate served {n} of 50 requests needed" in s.decisions[-1].reason
    s.run(200, until=lambda m: m.step == 1)
    assert "step 0 (5% on v2) passed" in s.decisions[-1].reason, s.decisions[-1].reason
    checks = s.decisions[-1].figures["checks"]
    assert checks["error_rate"]["candidate_n"] >= 50 and checks["latency"]["verdict"] == "pass"
    assert checks["confidence"]["verdict"] == "pass"


def test_a_comparison_registers_an_unknown_model_with_its_stable_version():
    c = Controller(ManualClock())
    c.observe(SignalObs("m", "2", 0.0, "error_rate_vs_stable", "error", False, 0.0, "quality",
                        reference_version="1", events=100))
    assert c.status("m")["stable"] == "1" and c.status("m")["versions"] == ["1", "2"]


def test_enum_values_a_newer_writer_may_send_are_read_as_unspecified():
    assert wire.signal(pb.Signal(model="m", version="1", kind=42)).kind == ""
    assert wire.alert(pb.Alert(fingerprint="f", state=9)).state == "unspecified"
    assert wire.decision_dict(pb.RolloutState(model="m", phase=77))["phase"] == "unspecified"

"""The rollout controller on simulated traffic with a manual clock: canary, blue/green and
shadow paths, rollback on errors, latency, drift and alerts, low traffic that pauses and
never rolls back, undo and history, and a restart that resumes where it was."""

from __future__ import annotations

import json
import math
import random

import pytest

from rollout import (FAILED, PAUSED, PROGRESSING, PROMOTED, ROLLED_BACK, AlertObs, Controller, DriftSignal,
                     Feedback, ManualClock, Outcome, RolloutConfig, RolloutError, Thresholds, Window, analyse)

M = "demo"
FAST = dict(interval=30.0, min_requests=50)


def good(rng):
    return rng.random() < 0.01, rng.lognormvariate(math.log(0.2), 0.3), rng.gauss(-1.0, 0.3)


def erring(rng):
    return rng.random() < 0.12, rng.lognormvariate(math.log(0.2), 0.3), rng.gauss(-1.0, 0.3)


def slow(rng):
    return rng.random() < 0.01, rng.lognormvariate(math.log(0.3), 0.3), rng.gauss(-1.0, 0.3)


class Sim:
    """Traffic at `rps` requests a second split by the controller's weights, copies to
    shadow versions, the controller ticked every second."""

    def __init__(self, candidate=good, stable=good, *, defaults=None, seed=0):
        self.clock = ManualClock()
        self.ctl = Controller(self.clock, defaults or RolloutConfig(**FAST))
        self.behave = {"v1": stable, "v2": candidate}
        self.rng = random.Random(seed)
        self.decisions = []
        self.ctl.register(M, "v1", "v2")
        self.drift = {}  # version -> (feature, drifted): a drift signal every 10 s

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
                    self.decisions += self.ctl.observe(DriftSignal(M, v, self.clock.now(), "ks", feature, drifted, 0.4))
            self.clock.advance(1.0)
            self.decisions += self.ctl.tick()
            if until and until(self.state()):
                break
        return self

    def outcome(self, version, route):
        err, lat, conf = self.behave[version](self.rng)
        self.decisions += self.ctl.observe(Outcome(M, version, self.clock.now(), err, lat, conf, route))

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
    assert a.state().step >= 1 and a.state().windows["v2"].n > 0
    b = Sim(good, seed=3)
    b.ctl = Controller.restore(json.loads(json.dumps(a.ctl.snapshot())), b.clock, a.ctl.defaults)
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
    b.clock.t = a.clock.t
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


def test_analysis_figures_against_scipy_and_calibration():
    from scipy import stats
    t = Thresholds()
    c, s = Window(0.0), Window(0.0)
    for i in range(400):
        c.add_outcome(i % 10 == 0, 0.2, -1.0)
        s.add_outcome(i % 50 == 0, 0.2, -1.0)
    a = analyse(c, s, t)
    e = a.figures()["checks"]["error_rate"]
    a1, a2 = 41 / 402, 9 / 402  # Agresti-Caffo: one error and one success added to each side
    z = (a1 - a2 - t.error_margin) / math.sqrt(a1 * (1 - a1) / 402 + a2 * (1 - a2) / 402)
    assert e["verdict"] == "fail" and e["z"] == pytest.approx(z, rel=1e-3)
    assert e["p"] == pytest.approx(stats.norm.sf(z), rel=1e-3)
    # calibration: the candidate is confident and wrong half the time
    c2, s2 = Window(0.0), Window(0.0)
    for i in range(100):
        c2.add_outcome(False, 0.2, -1.0)
        s2.add_outcome(False, 0.2, -1.0)
        c2.feedback.add((0.9, i % 2 == 0))
        s2.feedback.add((0.9, i % 10 != 0))
    a2 = analyse(c2, s2, t)
    cal = a2.figures()["checks"]["calibration"]
    assert cal["verdict"] == "fail" and cal["candidate_ece"] == pytest.approx(0.4)
    assert cal["stable_ece"] == pytest.approx(0.0, abs=1e-9) and cal["candidate_accuracy"] == 0.5


def test_feedback_calibration_rolls_back_in_a_rollout():
    s = Sim(good)
    s.ctl.start(M, "v2")
    orig = s.outcome

    def with_feedback(version, route):
        orig(version, route)
        right = s.rng.random() < (0.5 if version == "v2" else 0.9)
        s.ctl.observe(Feedback(M, version, s.clock.now(), 0.9, right))
    s.outcome = with_feedback
    s.run(3600, until=ended)
    assert s.decisions[-1].phase == ROLLED_BACK and "failed on calibration" in s.decisions[-1].reason


def test_enum_values_a_newer_writer_may_send_are_read_as_unspecified():
    from protos import events_pb2 as pb
    from rollout import wire

    assert wire.outcome(pb.InferenceEvent(model="m", version="1", route=7, status=99)).route == ""
    assert wire.drift_signal(pb.Signal(model="m", version="1", kind=42)).kind == ""
    assert wire.alert(pb.Alert(fingerprint="f", state=9)).state == "unspecified"
    assert wire.decision_dict(pb.RolloutState(model="m", phase=77))["phase"] == "unspecified"

"""The alert state machine and the notification pipeline on a manual clock: exact timers,
flapping, storms, silences, inhibition, throttling, deduplication across a restart."""

from __future__ import annotations

import random

import pytest

from alerting.clock import ManualClock
from alerting.config import config_from_text
from alerting.dispatch import Dispatcher
from alerting.engine import RuleEngine
from alerting.nflog import NotificationLog
from alerting.rules import rules_from_text
from alerting.signals import Signal
from alerting.silences import SilenceError, Silences
from eventbus.matchers import parse_matcher

T0 = 1_700_000_000.0

RULES = """
groups:
  - name: drift
    rules:
      - alert: FeatureDrift
        signal: {detector: ks, drifted: true}
        for: 1m
        keep_firing_for: 5m
        labels: {severity: warning}
        annotations:
          summary: "{{ $labels.feature }} of {{ $labels.model }} drifted ({{ $value }})"
      - alert: NoKeep
        signal: {detector: psi, statistic: "> 0.2"}
        labels: {severity: warning}
      - alert: RollbackFiring
        signal: {detector: page_hinkley, feature: error}
        labels: {severity: critical}
      - alert: HighErrorRate
        metric: {name: error_rate, window: 5m, aggregate: mean, above: 0.1}
        labels: {severity: critical}
"""

CONFIG = """
route:
  receiver: hook
  group_by: [alertname, model]
  group_wait: 30s
  group_interval: 5m
  repeat_interval: 1h
receivers:
  - name: hook
    webhook_configs: [{url: "http://127.0.0.1:1/hook"}]
"""


class Harness:
    def __init__(self, rules=RULES, config=CONFIG, nflog=None, silences=None):
        self.clock = ManualClock(T0)
        self.changes = []
        self.sent = []
        self.silences = silences or Silences()
        self.disp = Dispatcher(config_from_text(config), self.clock, silences=self.silences,
                               nflog=nflog or NotificationLog())
        self.eng = RuleEngine(rules_from_text(rules), self.clock, on_change=self.changes.append,
                              on_alert=self.disp.put)

    def sig(self, detector="ks", feature="total_seconds", model="m1", version="v1", drifted=True, statistic=0.4,
            p_value=0.001):
        self.eng.ingest(Signal(detector, feature, model, version, statistic, drifted, self.clock.now(),
                               p_value=p_value))

    def run_until(self, t: float, deliver: bool = True) -> list:
        """Advance to t, firing every timer of both heaps in time order; deliver what is due."""
        out = []
        while True:
            te, td = self.eng.next_deadline(), self.disp.next_deadline()
            nxt = min(x for x in (te, td, float("inf")) if x is not None)
            if nxt > t:
                break
            self.clock.set(max(nxt, self.clock.now()))
            if te is not None and te == nxt:
                self.eng.advance(nxt)
            else:
                for n in self.disp.advance(nxt):
                    out.append(n)
                    if deliver:
                        self.disp.delivered(n, True)
        self.clock.set(t)
        self.sent.extend(out)
        return out

    def states(self, rule=None):
        return [(c.state, c.at - T0) for c in self.changes if rule is None or c.rule == rule]


def test_for_is_exact():
    h = Harness()
    h.sig()
    assert h.states() == [("pending", 0)]
    h.run_until(T0 + 59.999)
    assert h.states() == [("pending", 0)]
    h.run_until(T0 + 60)
    assert h.states() == [("pending", 0), ("firing", 60)]
    inst = next(iter(h.eng.instances.values()))
    assert inst.fired_at == T0 + 60 and inst.annotations["summary"] == "total_seconds of m1 drifted (0.4)"
    # group_wait 30s after the alert reached the dispatcher
    assert h.run_until(T0 + 89.9) == []
    [n] = h.run_until(T0 + 90)
    assert n.group_key == '{}:{alertname="FeatureDrift", model="m1"}' and len(n.alerts) == 1


def test_pending_that_clears_never_fires():
    h = Harness()
    h.sig()
    h.clock.advance(30)
    h.sig(drifted=False)
    h.run_until(T0 + 3600)
    assert h.states() == [("pending", 0), ("inactive", 30)]
    assert h.sent == [] and not h.eng.instances


def test_flapping_with_keep_firing_for_gives_one_notification():
    h = Harness()
    h.sig()
    h.run_until(T0 + 60)  # firing
    for i in range(60):  # ten minutes of a detector flipping every 10 seconds
        h.run_until(h.clock.now() + 10)
        h.sig(drifted=i % 2 == 1)
    h.sig(drifted=False)  # then it settles
    t_false = h.clock.now()
    h.run_until(T0 + 3 * 3600)
    fd = h.states("FeatureDrift")
    assert [s for s, _ in fd] == ["pending", "firing", "resolved", "inactive"]
    assert fd[2][1] == t_false - T0 + 300  # resolved exactly keep_firing_for after the last false
    firing = [n for n in h.sent if n.status == "firing"]
    resolved = [n for n in h.sent if n.status == "resolved"]
    assert len(firing) == 1 and len(resolved) == 1, [(n.status, n.created_at - T0) for n in h.sent]


def test_flapping_without_keep_firing_for_is_what_it_prevents():
    h = Harness()
    for i in range(20):
        h.sig(detector="psi", statistic=0.3 if i % 2 == 0 else 0.1)
        h.run_until(h.clock.now() + 10)
    assert [s for s, _ in h.states("NoKeep")].count("firing") == 10


def test_signals_that_stop_end_the_alert_after_stale_after():
    h = Harness()
    h.sig()
    h.run_until(T0 + 60)
    h.run_until(T0 + 6 * 3600)
    # default stale_after 15m from the last signal, then keep_firing_for 5m
    assert h.states("FeatureDrift")[:3] == [("pending", 0), ("firing", 60), ("resolved", 900 + 300)]


def test_metric_rule_aggregates_over_its_window():
    h = Harness()
    for v in (0.05, 0.05, 0.08):  # mean 0.06
        h.sig(detector="error_rate", feature="error", statistic=v)
        h.clock.advance(60)
    assert h.states("HighErrorRate") == []
    h.sig(detector="error_rate", feature="error", statistic=0.4)  # mean 0.145 > 0.1
    assert h.states("HighErrorRate") == [("pending", 180), ("firing", 180)]
    inst = [i for i in h.eng.instances.values() if i.rule.name == "HighErrorRate"][0]
    assert inst.value == pytest.approx(0.145)
    h.clock.advance(400)  # the window forgets the spike
    h.sig(detector="error_rate", feature="error", statistic=0.0)
    assert h.states("HighErrorRate")[-1] == ("resolved", 580)


def test_grouping_timers_and_repeat_interval():
    h = Harness()
    h.sig(feature="total_seconds")
    h.run_until(T0 + 60)
    h.clock.advance(5)
    h.sig(feature="ttft")  # same group (alertname, model), pending
    [n1] = h.run_until(T0 + 90)  # group_wait of the first alert
    assert len(n1.alerts) == 1
    h.run_until(T0 + 130)  # ttft fires at 125: no flush before group_interval
    assert len(h.sent) == 1
    [n2] = h.run_until(T0 + 390)  # group_interval after the first flush
    assert len(n2.alerts) == 2
    for t in range(390, 3600, 60):  # nothing new: silence until repeat_interval
        h.run_until(T0 + t)
        h.sig(feature="total_seconds")
        h.sig(feature="ttft")
    assert len(h.sent) == 2
    h.sig(feature="total_seconds")
    h.sig(feature="ttft")
    [n3] = h.run_until(T0 + 390 + 3600)  # repeat_interval after n2, on a group_interval tick
    assert n3.firing == n2.firing


def test_storm_gives_at_most_one_notification_per_group_per_interval():
    h = Harness()
    rng = random.Random(7)
    label_sets = [(f"model-{m}", f) for m in range(50) for f in
                  ("latency", "ttft", "prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy",
                   "min_top1_prob", "error", "distinct_1", "distinct_2")]
    assert len(label_sets) == 500
    for i in range(10_000):
        t = T0 + i * 0.06
        h.run_until(t)
        model, feature = rng.choice(label_sets)
        h.sig(model=model, feature=feature)
    h.run_until(T0 + 3000)
    by_group: dict[str, list[float]] = {}
    for n in h.sent:
        by_group.setdefault(n.group_key, []).append(n.created_at)
    assert len(by_group) == 50
    for times in by_group.values():
        assert all(b - a >= 300 for a, b in zip(times, times[1:]))
    assert len(h.sent) <= 50 * (2400 // 300 + 1)
    # every one of the 500 alerts was told about
    told = set().union(*(n.firing for n in h.sent))
    assert len(told) == 500
    assert h.eng.signals_seen == 10_000


def test_silence_suppresses_and_expiry_lets_through():
    h = Harness()
    now = h.clock.now()
    with pytest.raises(SilenceError):
        h.silences.add([parse_matcher('model=~".*"')], now, now + 60, "me", "everything", now)
    s = h.silences.add([parse_matcher('model="m1"')], now, now + 3600, "alice", "known issue", now)
    h.sig(model="m1")
    h.sig(model="m2")
    h.run_until(T0 + 1000)
    assert [n.group_labels["model"] for n in h.sent] == ["m2"]
    h.silences.expire(s.id, h.clock.now())
    for _ in range(5):
        h.sig(model="m1")
        h.sig(model="m2")
        h.run_until(h.clock.now() + 120)
    assert [n.group_labels["model"] for n in h.sent] == ["m2", "m1"]


INHIBIT_CONFIG = CONFIG + """
inhibit_rules:
  - source_matchers: ['alertname="RollbackFiring"']
    target_matchers: ['severity="warning"']
    equal: [model]
"""


def test_inhibition_suppresses():
    h = Harness(config=INHIBIT_CONFIG)
    h.sig(detector="page_hinkley", feature="error", model="m1")  # source, fires at once
    h.sig(model="m1")  # warning of the same model: inhibited
    h.sig(model="m2")  # warning of another model: not
    h.run_until(T0 + 700)
    names = sorted((n.group_labels["alertname"], n.group_labels["model"]) for n in h.sent)
    assert names == [("FeatureDrift", "m2"), ("RollbackFiring", "m1")]
    # the source resolves: the warning comes through at the group's next flush
    h.sig(detector="page_hinkley", feature="error", model="m1", drifted=False)
    h.sig(model="m1")
    h.sig(model="m2")
    h.run_until(T0 + 1000)
    assert ("FeatureDrift", "m1") in [(n.group_labels["alertname"], n.group_labels["model"]) for n in h.sent]


THROTTLE_CONFIG = """
route:
  receiver: hook
  group_by: [alertname, model]
  group_wait: 30s
  group_interval: 5m
receivers:
  - name: hook
    throttle: {max_notifications: 2, interval: 1m}
    webhook_configs: [{url: "http://127.0.0.1:1/hook", max_alerts: 10}]
"""


def test_throttle_defers_and_folds_never_drops():
    h = Harness(config=THROTTLE_CONFIG)
    for m in range(5):
        for f in range(30 if m == 0 else 1):
            feat = ["latency", "ttft", "prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy"][f % 6]
            h.sig(model=f"m{m}", feature=feat, version=f"v{f // 6}")
    h.run_until(T0 + 60)
    h.run_until(T0 + 90)  # five groups due at once; the receiver takes two a minute
    assert len(h.sent) == 2
    h.run_until(T0 + 150)
    assert len(h.sent) == 4
    h.run_until(T0 + 210)
    assert len(h.sent) == 5
    assert {n.group_labels["model"] for n in h.sent} == {f"m{i}" for i in range(5)}
    big = [n for n in h.sent if n.group_labels["model"] == "m0"][0]
    assert len(big.alerts) == 10 and big.truncated == 20 and len(big.firing) == 30
    # nothing dropped from state
    assert sum(1 for i in h.eng.instances.values() if i.state == "firing") == 34


def test_restart_neither_resends_nor_forgets():
    h = Harness()
    h.sig()
    h.run_until(T0 + 100)
    assert len(h.sent) == 1
    snap = {"engine": h.eng.snapshot(), "nflog": h.disp.nflog.snapshot(), "silences": h.silences.snapshot()}

    # a new process, restored
    h2 = Harness()
    h2.clock.set(T0 + 200)
    h2.disp.nflog.restore(snap["nflog"])
    assert h2.eng.restore(snap["engine"]) == 1
    for inst in h2.eng.instances.values():
        h2.disp.put(h2.eng.alert_of(inst, h2.clock.now()))
    h2.sig()  # still drifting
    h2.run_until(T0 + 1000)
    assert h2.sent == [] and h2.changes == []  # nothing re-sent, nothing re-announced
    inst = next(iter(h2.eng.instances.values()))
    assert inst.state == "firing" and inst.fired_at == T0 + 60
    # and it still resolves on time, with a resolved notification
    h2.sig(drifted=False)
    h2.run_until(T0 + 2000)
    assert [s for s, _ in h2.states()] == ["resolved"]
    assert [n.status for n in h2.sent] == ["resolved"]


def test_reload_keeps_state_of_unchanged_rules():
    h = Harness()
    h.sig()
    h.sig(detector="psi", statistic=0.5)
    h.run_until(T0 + 60)
    new = RULES.replace("alert: NoKeep", "alert: Renamed")
    h.eng.replace_rules(rules_from_text(new), T0 + 60)
    by_rule = {i.rule.name: i.state for i in h.eng.instances.values()}
    assert by_rule == {"FeatureDrift": "firing"}  # NoKeep's alert was resolved and forgotten
    assert [(c.rule, c.state) for c in h.changes][-1] == ("NoKeep", "resolved")
    h.sig(detector="psi", statistic=0.5)
    assert {i.rule.name for i in h.eng.instances.values() if i.state == "firing"} == {"FeatureDrift", "Renamed"}


def test_signal_labels_are_alert_dimensions_and_survive_a_restart():
    h = Harness()
    for route in ("stable", "canary"):
        h.eng.ingest(Signal("psi", "total_seconds", "m1", "v2", 0.5, True, h.clock.now(), threshold=0.2,
                            labels={"route": route}, kind="drift"))
    insts = list(h.eng.instances.values())
    assert sorted(i.labels["route"] for i in insts) == ["canary", "stable"]
    assert len({i.fp for i in insts}) == 2
    h2 = Harness()
    assert h2.eng.restore(h.eng.snapshot()) == 2
    assert sorted(i.labels["route"] for i in h2.eng.instances.values()) == ["canary", "stable"]
    h2.eng.ingest(Signal("psi", "total_seconds", "m1", "v2", 0.1, False, h2.clock.now(), labels={"route": "canary"}))
    assert sorted(i.state for i in h2.eng.instances.values()) == ["firing", "resolved"]


def test_labels_outside_the_series_never_split_an_alert():
    """A reading's own figures (a sender that still puts them in labels) are not the series:
    one drift is one instance, one fingerprint, pending, firing, then resolved."""
    h = Harness()
    for i in range(5):
        h.eng.ingest(Signal("ks", "mean_entropy", "m1", "v1", 0.4, True, h.clock.now(), p_value=1e-9,
                            labels={"events": str(100 * i), "detections": str(i), "route": "stable"}))
        h.run_until(h.clock.now() + 30)
    h.eng.ingest(Signal("ks", "mean_entropy", "m1", "v1", 0.01, False, h.clock.now(), p_value=0.9,
                        labels={"events": "600", "route": "stable"}))
    h.run_until(h.clock.now() + 3600)
    assert len({c.fingerprint for c in h.changes}) == 1
    assert [s for s, _ in h.states()] == ["pending", "firing", "resolved", "inactive"]  # then forgotten
    assert h.changes[-2].labels["route"] == "stable" and "events" not in h.changes[-2].labels


def test_a_series_that_clears_and_comes_back_in_one_instant_keeps_one_alert():
    """Pending, cleared and pending again at the same time: the cleared instance's timer
    must not take the new one with it (the new one fired, was forgotten, and never resolved)."""
    h = Harness()
    h.sig()
    h.sig(drifted=False)
    h.sig()
    h.run_until(T0 + 60)
    assert [s for s, _ in h.states()] == ["pending", "inactive", "pending", "firing"]
    assert len(h.eng.instances) == 1
    h.sig(drifted=False)
    h.run_until(T0 + 3600)
    assert [s for s, _ in h.states()][-2:] == ["resolved", "inactive"]

"""Response policies: the file's checker (every error names its line), and what the
controller does with a firing alert on a version in production: fallback during the watch
after a promotion, recalibrate, retrain (left pending for the service), notify-only; each
alert instance acted on once per rule, cooldowns and limits, dry-run."""

from __future__ import annotations

import pytest

from rollout.controller import Controller, action_id
from eventbus.matchers import parse_matcher
from eventbus.yamlpos import FileErrors
from rollout.policy import DEFAULT_POLICY, load_policy, parse_policy
from rollout.records import PROMOTED, ROLLED_BACK, AlertObs, ManualClock, SignalObs

M = "m"

FALLBACK = """
rules:
  - name: fb
    matchers: ['severity="critical"', 'category=~"quality|drift"']
    action: fallback
    cooldown: 10m
    limit: 1
    window: 1h
"""


def promoted(policy_text: str = FALLBACK, dry_run: bool = False, watch: float = 600.0):
    clock = ManualClock()
    c = Controller(clock, policy=parse_policy(policy_text, "p.yml"), dry_run=dry_run)
    c.register(M, "v1", "v2", "v3")
    c.start(M, "v2", steps=[100], watch=watch)
    d = c.promote(M)
    return c, clock, d


def alert(fp="f1", version="v2", rule="FeedbackScoreShift", severity="critical", category="quality", starts=1.0,
          state="firing", **labels):
    return AlertObs(fp, rule, state, {"model": M, "version": version, "severity": severity, "category": category,
                                      "alertname": rule, **labels}, starts + 1, starts)


def test_the_shipped_policy_loads():
    p = load_policy(DEFAULT_POLICY)
    assert {r.action for r in p.rules} == {"fallback", "recalibrate", "notify-only"}


@pytest.mark.parametrize("text, expected", [
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: reboot\n", "p.yml:4: rules[0].action: 'reboot' is not one of"),
    ("rules:\n  - name: a\n    matchers: ['x=~\"(\"']\n    action: fallback\n", "p.yml:3: rules[0].matchers[0]:"),
    ("rules:\n  - matchers: ['x=\"1\"']\n    action: fallback\n", "p.yml:2: rules[0].name: is missing"),
    ("rules:\n  - name: a\n    action: fallback\n", "p.yml:2: rules[0].matchers: is missing"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: fallback\n    cooldown: soon\n",
     "p.yml:5: rules[0].cooldown: not a valid duration string: 'soon'"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: fallback\n    limit: 0\n",
     "p.yml:5: rules[0].limit: 0 is not a whole number >= 1"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: fallback\n    url: http://x\n",
     "p.yml:5: rules[0].url: unknown key 'url' (only for action retrain)"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: fallback\n    during: later\n",
     "p.yml:5: rules[0].during: 'later' is not watch"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: retrain\n", "p.yml:2: rules[0].url: is missing"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: retrain\n    url: ftp://x\n    hmac_secret: k\n",
     "p.yml:5: rules[0].url: 'ftp://x' is not an http"),
    ("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: retrain\n    url: http://x\n",
     "p.yml:2: rules[0].hmac_secret: is missing"),
    ("rules:\n  - {name: a, matchers: ['x=1'], action: notify-only}\n  - {name: a, matchers: ['x=1'], action: notify-only}\n",
     "p.yml:3: rules[1].name: 'a' is already the name of the rule at line 2"),
    ("rule: []\n", "p.yml:1: rule: unknown key 'rule'"),
    ("rules:\n  - name: a\n  - name: a\n", "p.yml:2:"),
    ("rules: [\n", "p.yml:2: yaml:"),
])
def test_bad_policies_name_the_line(text, expected):
    with pytest.raises(FileErrors) as e:
        parse_policy(text, "p.yml")
    assert expected in str(e.value), str(e.value)
    assert all(str(err).startswith("p.yml:") for err in e.value.errors)


def test_matchers_as_alertmanager_writes_them():
    assert parse_matcher('severity="critical"').matches({"severity": "critical"})
    assert not parse_matcher('severity!="critical"').matches({"severity": "critical"})
    assert parse_matcher('category=~"quality|drift"').matches({"category": "drift"})
    assert not parse_matcher('category=~"qual"').matches({"category": "quality"})  # anchored
    assert parse_matcher('version!~"canary.*"').matches({"version": "2"})
    with pytest.raises(ValueError, match="bad matcher"):
        parse_matcher("severity")


def test_a_critical_alert_on_the_promoted_version_falls_back_to_the_last_healthy_one():
    c, clock, d = promoted()
    assert d.phase == PROMOTED and d.weights == {"v2": 1.0} and d.keep_loaded == ["v1"]
    clock.advance(30)
    out = c.observe(alert())
    assert len(out) == 1
    back = out[0]
    assert back.phase == ROLLED_BACK and back.stable == "v1" and back.weights == {"v1": 1.0}
    assert "FeedbackScoreShift" in back.reason and "from v2 to v1" in back.reason and "fb" in back.reason
    [a] = c.take_actions()
    assert (a.action, a.outcome, a.target_version, a.generation) == ("fallback", "done", "v1", back.generation)
    assert a.action_id == action_id("fb", "f1", 1.0)
    assert c.history(M)[-1]["action"] == "fallback"
    # the same alert again (redelivered), and after a restart that read the actions back
    assert c.observe(alert()) == [] and c.take_actions() == []
    again = Controller.restore(c.snapshot(), clock, policy=c.policy)
    again.load_actions([a.to_dict()])
    assert again.observe(alert()) == [] and again.take_actions() == []


def test_alerts_that_do_not_match_or_are_not_about_production_do_nothing():
    c, clock, _ = promoted()
    assert c.observe(alert(severity="warning")) == [] and c.take_actions() == []
    assert c.observe(alert(fp="f2", version="v1")) == []
    [a] = c.take_actions()
    assert a.outcome == "skipped" and "not the version in production" in a.reason
    assert c.decision(M).phase == PROMOTED


def test_after_the_watch_a_watch_only_rule_skips_and_an_always_rule_falls_back():
    c, clock, _ = promoted(watch=60)
    clock.advance(61)
    [end] = c.tick()
    assert end.keep_loaded == [] and "watch of v2 ended" in end.reason
    assert c.observe(alert()) == []
    assert "is watched" in c.take_actions()[0].reason
    c2, clock2, _ = promoted(FALLBACK.replace("action: fallback", "action: fallback\n    during: always"), watch=60)
    clock2.advance(61)
    c2.tick()
    [back] = c2.observe(alert())
    assert back.stable == "v1" and back.phase == ROLLED_BACK


def test_cooldown_and_limit_make_one_drift_one_action():
    text = FALLBACK.replace("action: fallback", "action: notify-only").replace("limit: 1", "limit: 2")
    c, clock, _ = promoted(text)
    c.observe(alert(fp="a", feature="x"))
    c.observe(alert(fp="b", feature="y"))         # same version, inside the cooldown
    clock.advance(601)
    c.observe(alert(fp="c", version="v1"))        # another version: no cooldown, the limit's second
    c.observe(alert(fp="d", version="v3"))        # a third in the window: over the limit
    outcomes = [(a.version, a.outcome) for a in c.take_actions()]
    assert outcomes == [("v2", "done"), ("v2", "skipped"), ("v1", "done"), ("v3", "skipped")]


def test_dry_run_records_what_it_would_do_and_changes_nothing():
    c, clock, d = promoted(dry_run=True)
    assert c.observe(alert()) == []
    [a] = c.take_actions()
    assert a.outcome == "dry-run" and a.reason.startswith("would have done: fallback of m from v2 to v1")
    assert c.decision(M).generation == d.generation and c.decision(M).stable == "v2"


RECAL = """
rules:
  - name: recal
    matchers: ['alertname="HighCalibrationError"']
    action: recalibrate
    min_improvement: 0.01
    min_held_out: 40
"""


def temperature(version, t, before, after, held=100):
    return SignalObs(M, version, 5.0, "temperature", "label", False, t, "calibration",
                     recalibration={"temperature": t, "ece_before": before, "ece_after": after, "accuracy": 0.8,
                                    "fitted": 200, "held_out": held})


def test_recalibrate_publishes_a_temperature_only_where_it_lowers_held_out_ece():
    c, clock, _ = promoted(RECAL)
    ece = alert(rule="HighCalibrationError", category="calibration", severity="warning")
    assert c.observe(ece) == []                       # before any temperature: it waits
    [a] = c.take_actions()
    assert a.outcome == "waiting" and "no temperature" in a.reason
    assert c.observe(temperature("v2", 2.0, 0.20, 0.19)) == []  # not enough better: still waiting
    [a] = c.take_actions()
    assert a.outcome == "waiting" and "does not lower held-out ECE enough" in a.reason
    assert c.observe(temperature("v2", 2.0, 0.20, 0.19)) == [] and c.take_actions() == []  # nothing new
    c.observe(temperature("v1", 2.5, 0.20, 0.04))     # another version's: not this alert's
    assert c.take_actions() == []
    [d] = c.observe(temperature("v2", 2.5, 0.20, 0.04))  # one that helps, while the alert still fires
    assert d.temperatures == {"v2": 2.5} and "temperature 2.5" in d.reason
    [a] = c.take_actions()
    assert a.outcome == "done" and a.details["ece_after"] == 0.04 and a.action_id == action_id("recal", "f1", 1.0)
    assert c.observe(temperature("v2", 3.0, 0.20, 0.02)) == [] and c.observe(ece) == []  # acted: once
    # the alert fires again later: the processors fit on probabilities already scaled by 2.5,
    # so the temperature published composes with it
    clock.advance(3600)
    c.observe(alert(state="resolved"))
    [d] = c.observe(alert(rule="HighCalibrationError", category="calibration", severity="warning", starts=3601.0))
    assert d.temperatures == {"v2": pytest.approx(2.5 * 3.0)}
    # resolved before a temperature came: nothing is waiting any more
    c2, _, _ = promoted(RECAL)
    c2.observe(ece)
    c2.observe(alert(state="resolved"))
    c2.take_actions()
    assert c2.observe(temperature("v2", 2.5, 0.20, 0.04)) == [] and c2.take_actions() == []


def test_retrain_is_left_pending_for_the_service_with_the_drift_start():
    text = """
rules:
  - name: rt
    matchers: ['alertname="ConceptDrift"']
    action: retrain
    url: http://127.0.0.1:1/hook
    hmac_secret: s3cret
    lookback: 1m
"""
    c, clock, _ = promoted(text)
    c.observe(SignalObs(M, "v2", 100.0, "adwin", "prediction_error", True, 0.4, "quality"))
    assert c.observe(alert(rule="ConceptDrift", starts=500.0)) == []
    [a] = c.take_actions()
    assert a.outcome == "pending" and a.details["since"] == 440.0 and a.details["url"] == "http://127.0.0.1:1/hook"
    assert a.details["signals"][0]["detector"] == "adwin"


def test_check_policy_names_each_error_with_file_and_line(tmp_path, capsys):
    from rollout.cli import main
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(FALLBACK)
    bad.write_text("rules:\n  - name: a\n    matchers: ['x=\"1\"']\n    action: reboot\n    cooldown: soon\n")
    assert main(["check-policy", str(good)]) == 0
    assert "1 rules OK" in capsys.readouterr().out
    assert main(["check-policy", str(good), str(bad)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{bad}:4: rules[0].action: 'reboot' is not one of fallback, retrain, recalibrate, notify-only",
                   f"{bad}:5: rules[0].cooldown: not a valid duration string: 'soon' (units y w d h m s ms, largest first)"]
    assert main(["check-policy", str(tmp_path / "none.yml")]) == 1
    assert "none.yml:0: file: cannot read" in capsys.readouterr().err


def test_the_wire_carries_temperatures_keep_loaded_recalibrations_and_actions():
    from protos import events_pb2
    from rollout import wire
    c, clock, d = promoted(RECAL)
    sig = events_pb2.Signal(model=M, version="v2", detector="temperature", feature="label",
                            kind=events_pb2.SIGNAL_KIND_CALIBRATION, statistic=2.5)
    sig.recalibration.temperature, sig.recalibration.ece_before, sig.recalibration.ece_after = 2.5, 0.2, 0.04
    sig.recalibration.held_out = 100
    c.observe(wire.signal(sig))
    a = events_pb2.Alert(fingerprint="g", rule="HighCalibrationError", state=events_pb2.ALERT_STATE_FIRING,
                         severity="warning", labels={"model": M, "version": "v2"})
    a.starts_at.FromSeconds(1_700_000_000)
    obs = wire.alert(a)
    assert obs.starts_at == 1_700_000_000 and obs.labels["severity"] == "warning"
    [dec] = c.observe(obs)
    msg = wire.rollout_state(dec)
    assert dict(msg.temperatures) == {"v2": 2.5} and list(msg.keep_loaded) == ["v1"]
    back = wire.decision_dict(events_pb2.RolloutState.FromString(msg.SerializeToString()))
    assert back["temperatures"] == {"v2": 2.5} and back["keep_loaded"] == ["v1"]
    [rec] = c.take_actions()
    again = wire.action_record(events_pb2.Action.FromString(wire.action(rec).SerializeToString()))
    assert again == rec


def test_status_shows_the_version_kept_loaded_and_the_temperatures():
    from rollout.api import LocalApi
    from rollout.cli import show_status
    c, clock, _ = promoted(RECAL)
    c.observe(temperature("v2", 2.5, 0.20, 0.04))
    c.observe(alert(rule="HighCalibrationError", category="calibration", severity="warning"))
    text = show_status(LocalApi(c).call("status", model=M))
    assert "kept loaded as the last healthy version: v1" in text and "temperatures v2 2.5" in text, text

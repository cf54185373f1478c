"""Alerting rules and configuration: parsing, the check-rules validator (a table of bad
files, each with its error), templates, durations, fingerprints, and the deploy/ files
checked by promtool and amtool."""

from __future__ import annotations

import subprocess
import textwrap

import pytest

from alerting.cli import check_config_main, check_rules_main
from alerting.config import config_from_text, parse_config
from alerting.durations import format_duration, parse_rfc3339, rfc3339
from alerting.labels import fingerprint, fingerprint_hex, labelset_string, matchers_string, parse_matchers
from alerting.rules import load_rules, parse_rules, rules_from_text
from alerting.templates import Template, go_float
from eventbus.durations import parse_duration
from eventbus.matchers import parse_matcher
from eventbus.yamlpos import FileErrors
from tests.helpers.tools import require_tool
from tests.helpers import ROOT

DEFAULT_RULES = ROOT / "alerting" / "default_rules.yml"
DEFAULT_CONFIG = ROOT / "alerting" / "default_config.yml"


def test_fingerprint_is_alertmanagers():
    # Values read back from a real Alertmanager 0.25 (GET /api/v2/alerts); the live check is
    # in test_alerting_peers.py.
    assert fingerprint_hex({"alertname": "X", "model": "smollm2", "feature": "latency", "v": "ü"}) == "26adbc06d8e04e74"
    assert fingerprint({}) == 0xCBF29CE484222325  # FNV-1a offset basis, as model.emptyLabelSignature
    a = {"b": "2", "a": "1"}
    assert fingerprint(a) == fingerprint(dict(sorted(a.items())))
    # the 0xff separators keep a="bc" and ab="c" apart
    assert fingerprint({"a": "bc"}) != fingerprint({"ab": "c"})


def test_labelset_and_matcher_strings_follow_alertmanager():
    assert labelset_string({"model": "m", "alertname": 'X"y'}) == '{alertname="X\\"y", model="m"}'
    ms = parse_matchers('{severity="critical", model=~"small.*",team!=ops}')
    assert matchers_string(ms) == '{severity="critical",model=~"small.*",team!="ops"}'
    m = parse_matcher('model=~"smol|big"')
    assert m.matches({"model": "smol"}) and not m.matches({"model": "smoll"})
    assert parse_matcher('x!~"a.*"').matches({}) and not parse_matcher('x!~"a.*"').matches({"x": "ab"})
    for bad in ['=x', 'a=="', 'a=~"("', "1a=b"]:
        with pytest.raises(ValueError):
            parse_matcher(bad)


def test_durations():
    assert parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25 and parse_duration("0") == 0
    assert parse_duration("1w2d") == 9 * 86400
    for bad in ["5", "1m1h", "5 m", "", "-5m", "1.5h", 5]:
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert format_duration(5400.25) == "1h30m250ms"
    assert rfc3339(1700000000.5) == "2023-11-14T22:13:20.5Z" and rfc3339(None) == "0001-01-01T00:00:00Z"
    assert parse_rfc3339("2023-11-14T22:13:20.500000000Z") == 1700000000.5


def test_templates_render_like_prometheus():
    labels = {"feature": "latency", "model": "smollm2"}
    t = Template('{{ $labels.feature }} of {{ .Labels.model }}: {{ $value }} / {{ $value | humanize }} / '
                 '{{ printf "%.2f" $value }} / {{ humanizePercentage 0.0512 }} / {{ humanizeDuration 3725 }} / '
                 '{{ index $labels "model" | toUpper }}{{/* note */}} {{- " end" }}')
    assert t.render(labels, 1234.5) == ("latency of smollm2: 1234.5 / 1.234k / 1234.50 / 5.12% / 1h 2m 5s / "
                                        "SMOLLM2 end")
    assert Template("{{ $labels.missing }}").render({}) == "<no value>"
    assert Template('{{ humanize $labels.model }}').render(labels).startswith("<error expanding template")
    assert Template('{{ printf "%d" $labels.model }}').render(labels) == "%!d(smollm2)"  # as Go's fmt does
    assert [go_float(x) for x in (0.5, 1e-05, 100000.0, 1e6, 3.0)] == ["0.5", "1e-05", "100000", "1e+06", "3"]


# A table of bad rule files: (name, yaml, line, field, words in the message)
BAD_RULES = [
    ("unknown key in rule", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                severity: critical
        """, 7, "groups[0].rules[0](A).severity", "unknown key 'severity'"),
    ("promql expr", """
        groups:
          - name: g
            rules:
              - alert: A
                expr: up == 0
        """, 6, "groups[0].rules[0](A).expr", "Vigil rules take `signal:`"),
    ("bad for", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                for: 5 minutes
        """, 7, "groups[0].rules[0](A).for", "not a valid duration string"),
    ("bad keep_firing_for", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                keep_firing_for: 10
        """, 7, "groups[0].rules[0](A).keep_firing_for", "not a duration string"),
    ("unknown detector", """
        groups:
          - name: g
            rules:
              - alert: A
                signal:
                  detector: kolmogorov
        """, 7, "groups[0].rules[0](A).signal.detector", "no processor publishes the detector 'kolmogorov'"),
    ("unknown feature", """
        groups:
          - name: g
            rules:
              - alert: A
                signal:
                  detector: ks
                  feature: total_secs
        """, 8, "groups[0].rules[0](A).signal.feature",
     "no processor publishes the feature 'total_secs' (did you mean total_seconds"),
    ("a detector that does not publish the feature", """
        groups:
          - name: g
            rules:
              - alert: A
                signal:
                  detector: adwin
                  feature: total_seconds
        """, 8, "groups[0].rules[0](A).signal.feature",
     "no processor publishes feature 'total_seconds' for detector 'adwin' (it publishes: mean_logprob, "
     "prediction_error, score)"),
    ("regex matching no feature", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks, feature: "=~lat_.*"}
        """, 6, "groups[0].rules[0](A).signal.feature", "matches no published feature"),
    ("broken regex", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks, model: "=~smol("}
        """, 6, "groups[0].rules[0](A).signal.model", "bad regular expression"),
    ("unclosed template", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                annotations:
                  summary: "{{ $labels.feature drifted"
        """, 8, "groups[0].rules[0](A).annotations.summary", "broken template: unclosed action"),
    ("unknown template function", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                annotations:
                  summary: "{{ $value | humanise }}"
        """, 8, "groups[0].rules[0](A).annotations.summary", "function 'humanise' not defined"),
    ("unknown template variable", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                labels:
                  team: "{{ $label.team }}"
        """, 8, "groups[0].rules[0](A).labels.team", "undefined variable '$label'"),
    ("bad test", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks, p_value: "below 0.01"}
        """, 6, "groups[0].rules[0](A).signal.p_value", "bad test 'below 0.01'"),
    ("signal and metric", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                metric: {name: ece, above: 0.1}
        """, 5, "groups[0].rules[0](A)", "exactly one of `signal` or `metric`"),
    ("unknown metric", """
        groups:
          - name: g
            rules:
              - alert: A
                metric: {name: latency_p98, above: 2}
        """, 6, "groups[0].rules[0](A).metric.name",
     "no processor publishes the metric 'latency_p98' (did you mean latency_p99, latency_p95"),
    ("mean without window", """
        groups:
          - name: g
            rules:
              - alert: A
                metric:
                  name: ece
                  aggregate: mean
                  above: 0.1
        """, 8, "groups[0].rules[0](A).metric.window", "needs a `window`"),
    ("missing alert name", """
        groups:
          - name: g
            rules:
              - signal: {detector: ks}
        """, 5, "groups[0].rules[0].alert", "missing `alert`"),
    ("alertname label", """
        groups:
          - name: g
            rules:
              - alert: A
                signal: {detector: ks}
                labels: {alertname: B}
        """, 7, "groups[0].rules[0](A).labels.alertname", "comes from the rule's `alert`"),
    ("duplicate group", """
        groups:
          - name: g
            rules: []
          - name: g
            rules: []
        """, 5, "groups[1].name", "repeated (first on line 2)"),
    ("duplicate key", """
        groups:
          - name: g
            name: h
            rules: []
        """, 4, "yaml", "duplicate key 'name'"),
    ("yaml syntax", """
        groups:
          - name: g
            rules: [
        """, 5, "yaml", "expected"),
    ("unknown top-level key", """
        group:
          - name: g
        """, 2, "group", "unknown key 'group'"),
]


@pytest.mark.parametrize("name,text,line,field,words", BAD_RULES, ids=[b[0] for b in BAD_RULES])
def test_bad_rule_files(tmp_path, capsys, name, text, line, field, words):
    f = tmp_path / "rules.yml"
    f.write_text(textwrap.dedent(text).lstrip("\n"))
    _, errors = parse_rules(f.read_text(), str(f))
    assert errors, name
    e = errors[0]
    assert (e.line, e.field) == (line - 1, field), str(e)
    assert words in e.message, str(e)
    assert check_rules_main([str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:{line - 1}: {field}: " in err


def test_check_rules_reports_every_error_and_file(tmp_path, capsys):
    good = tmp_path / "good.yml"
    good.write_text("groups: [{name: g, rules: [{alert: A, signal: {detector: psi, statistic: '> 0.2'}}]}]\n")
    bad = tmp_path / "bad.yml"
    bad.write_text(textwrap.dedent("""\
        groups:
          - name: g
            rules:
              - alert: A
                for: 1x
                signal: {detector: nope}
                annotations: {s: "{{ if }}"}
        """))
    assert check_rules_main([str(good), str(bad)]) == 1
    out = capsys.readouterr()
    assert "good.yml\n  SUCCESS: 1 rules found" in out.out
    assert "FAILED: 3 errors" in out.err
    assert f"{bad}:5: groups[0].rules[0](A).for:" in out.err
    assert f"{bad}:6: groups[0].rules[0](A).signal.detector:" in out.err
    assert f"{bad}:7: groups[0].rules[0](A).annotations.s: broken template" in out.err
    with pytest.raises(FileErrors) as ei:
        load_rules([good, bad])
    assert len(ei.value.errors) == 3
    # an extended vocabulary accepts a detector of one's own
    own = tmp_path / "own.yml"
    own.write_text("groups: [{name: g, rules: [{alert: A, signal: {detector: nope, feature: mine}}]}]\n")
    assert check_rules_main([str(own)]) == 1
    assert check_rules_main([str(own), "--detector", "nope", "--feature", "mine"]) == 0


def test_default_rules_are_valid_and_cover_the_demo(capsys):
    assert check_rules_main([str(DEFAULT_RULES)]) == 0
    rs = load_rules([DEFAULT_RULES])
    drift_features = {r.matchers["feature"].value for r in rs.rules if r.kind == "signal" and "feature" in r.matchers}
    assert {"prompt_tokens", "completion_tokens", "mean_logprob", "mean_entropy", "min_top1_prob", "total_seconds",
            "first_token_seconds", "finish_reason"} <= drift_features
    metrics = {r.name: r for r in rs.rules if r.kind == "metric"}
    assert {"HighCalibrationError", "HighErrorRate", "HighP99Latency"} <= set(metrics)
    assert all(r.labels["severity"].render({}) in ("warning", "critical") for r in rs.rules)


def test_rule_semantics_parse():
    rs = rules_from_text("""
groups:
  - name: g
    rules:
      - alert: A
        signal: {detector: "=~ks|psi", feature: total_seconds, p_value: "< 0.01", statistic: ">= 0.2"}
        for: 2m
        keep_firing_for: 1h
        stale_after: 30m
      - alert: B
        signal: {detector: adwin}
      - alert: C
        metric: {detector: p99, feature: total_seconds, window: 5m, aggregate: max, below: 3}
""")
    a, b, c = rs.rules
    assert (a.for_, a.keep_firing_for, a.stale_after) == (120, 3600, 1800)
    assert a.test_text == "statistic >= 0.2 and p_value < 0.01"
    assert b.test_text == "drifted is true"  # no test means drifted: true
    assert c.kind == "metric" and c.window == 300 and c.aggregate == "max" and c.predicate(2.5) and not c.predicate(3)


BAD_CONFIGS = [
    ("undefined receiver", """
        route: {receiver: nobody}
        receivers: [{name: r}]
        """, 1, "route.receiver", "undefined receiver 'nobody'"),
    ("old match syntax", """
        route:
          receiver: r
          routes:
            - match: {severity: critical}
        receivers: [{name: r}]
        """, 4, "route.routes[0].match", "use `matchers:"),
    ("bad matcher", """
        route:
          receiver: r
          routes:
            - matchers: ['severity=~"("']
        receivers: [{name: r}]
        """, 4, "route.routes[0].matchers[0]", "bad regular expression"),
    ("bad group_wait", """
        route: {receiver: r, group_wait: soon}
        receivers: [{name: r}]
        """, 1, "route.group_wait", "not a valid duration"),
    ("webhook without url", """
        route: {receiver: r}
        receivers:
          - name: r
            webhook_configs: [{send_resolved: true}]
        """, 4, "receivers[0].webhook_configs[0].url", "needs an http(s) url"),
    ("bad throttle", """
        route: {receiver: r}
        receivers:
          - name: r
            throttle: {max_notifications: 0}
        """, 4, "receivers[0].throttle.max_notifications", "a whole number >= 1"),
]


@pytest.mark.parametrize("name,text,line,field,words", BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_bad_configs(name, text, line, field, words):
    _, errors = parse_config(textwrap.dedent(text).lstrip("\n"), "c.yml")
    assert errors, name
    e = errors[0]
    assert (e.line, e.field) == (line, field) and words in e.message, str(e)


def test_config_routes_like_alertmanager():
    cfg = config_from_text("""
route:
  receiver: default
  group_by: [alertname]
  routes:
    - matchers: ['severity="critical"']
      receiver: pager
      continue: true
      routes:
        - matchers: ['model="big"']
          receiver: big-pager
    - matchers: ['severity=~"critical|warning"']
      receiver: chat
      group_by: ['...']
receivers: [{name: default}, {name: pager}, {name: big-pager}, {name: chat}]
""")
    names = lambda labels: [r.receiver for r in cfg.route.match(labels)]  # noqa: E731
    assert names({"severity": "critical", "model": "big"}) == ["big-pager", "chat"]
    assert names({"severity": "critical"}) == ["pager", "chat"]
    assert names({"severity": "info"}) == ["default"]
    r = cfg.route.match({"severity": "critical", "model": "big"})[0]
    assert r.key == '{}/{severity="critical"}/{model="big"}' and r.group_by == ("alertname",)
    assert cfg.route.match({"severity": "warning"})[0].group_by_all


def test_shipped_configs(capsys):
    assert check_config_main([str(DEFAULT_CONFIG)]) == 0


def test_promtool_checks_prometheus_rules():
    out = subprocess.run([require_tool("promtool"), "check", "rules", str(ROOT / "deploy" / "prometheus-rules.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
    text = (ROOT / "deploy" / "prometheus-rules.yml").read_text()
    for metric in ("vigil_requests_total", "vigil_e2e_request_latency_seconds_bucket",
                   "vigil_time_to_first_token_seconds_bucket", "vigil_num_requests_waiting",
                   "vigil_kv_cache_usage_ratio"):
        assert metric in text


def test_amtool_checks_alertmanager_config():
    out = subprocess.run([require_tool("amtool"), "check-config", str(ROOT / "deploy" / "alertmanager.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout

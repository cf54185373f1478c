"""The alerting configuration as `vigil alerting check-config` loads it: webhook and
Alertmanager URLs that could never be sent to are refused, naming line and field; any
file, of any shape or bytes, gives a configuration or errors naming the line and field,
never an exception."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alerting import config as config_module
from alerting.config import load_config, parse_config
from eventbus.yamlpos import FileErrors

# derandomize: the suite sees the same inputs every run (explore with a larger max_examples by hand)
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

FULL = config_module.__doc__[config_module.__doc__.index("    global:"):]  # the module's documented example
FULL = textwrap.dedent(FULL).replace("hmac_secret_file: /run/secrets/hook   # or hmac_secret:", "hmac_secret: s")


def test_the_documented_example_is_a_valid_configuration():
    cfg, errors = parse_config(FULL)
    assert not errors and cfg is not None, errors


def test_check_config_refuses_urls_without_a_host_or_with_a_bad_port(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(textwrap.dedent("""\
        route: {receiver: r}
        receivers:
          - name: r
            webhook_configs:
              - url: http://
              - url: http://127.0.0.1:99999/x
              - url: http://127.0.0.1:9000/ok
        alertmanagers:
          - url: http://alertmanager:port/
        """))
    result = subprocess.run([sys.executable, "-m", "vigil.cli", "alerting", "check-config", str(path)],
                            capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode == 1, result.stdout
    assert f"{path}:5: receivers[0].webhook_configs[0].url: 'http://' has no host" in result.stderr
    assert (f"{path}:6: receivers[0].webhook_configs[1].url: 'http://127.0.0.1:99999/x': port out of range"
            in result.stderr)
    assert f"{path}:9: alertmanagers[0].url: 'http://alertmanager:port/': port could not be cast" in result.stderr
    assert "webhook_configs[2]" not in result.stderr and "Traceback" not in result.stderr


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
                      | st.sampled_from(["http://", "http://h:99999/", "https://h/x", "30s", "-1s", "severity=\"x\"",
                                         "...", "r", "${HOME}/x"]),
                      lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=12)
keys = st.sampled_from(["global", "route", "receivers", "inhibit_rules", "alertmanagers", "templates",
                        "receiver", "group_by", "group_wait", "group_interval", "repeat_interval", "matchers",
                        "continue", "routes", "name", "webhook_configs", "throttle", "max_concurrency",
                        "queue_size", "url", "url_file", "send_resolved", "max_alerts", "timeout", "hmac_secret",
                        "hmac_secret_file", "max_attempts", "backoff", "max_backoff", "headers",
                        "max_notifications", "interval", "source_matchers", "target_matchers", "equal",
                        "external_url", "external_labels", "resend_interval", "match"])
trees = st.recursive(values, lambda c: st.dictionaries(keys, c, max_size=5) | st.lists(c, max_size=3), max_leaves=25)


@st.composite
def mutated(draw) -> str:
    """The documented example with lines dropped, repeated, or a value replaced."""
    lines = FULL.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        how = draw(st.sampled_from(["drop", "repeat", "value", "text"]))
        if how == "drop":
            del lines[i]
        elif how == "repeat":
            lines.insert(i, lines[i])
        elif how == "value" and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}: {yaml.safe_dump(draw(values), default_flow_style=True).strip()}"
        else:
            lines[i] = draw(st.text(max_size=30))
        if not lines:
            break
    return "\n".join(lines)


config_texts = st.one_of(trees.map(lambda t: yaml.safe_dump(t)), mutated(), st.text(max_size=200))


def assert_named(errors) -> None:
    for e in errors:
        assert e.line >= 0 and isinstance(e.message, str) and e.message, e
        assert e.field or e.message.startswith("unknown key ''"), e  # an empty key is its own empty field


@FUZZ
@given(text=config_texts)
def test_any_configuration_text_gives_a_config_or_errors_naming_line_and_field(text):
    cfg, errors = parse_config(text, "fuzz.yml")
    assert (cfg is None) == bool(errors)
    assert_named(errors)


@FUZZ
@given(data=st.binary(max_size=200) | config_texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_configuration_file_loads_or_raises_only_errors_naming_the_problem(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "config.yml"
    path.write_bytes(data)
    try:
        load_config(path)
    except FileErrors as e:
        assert e.errors
        assert_named(e.errors)

"""Every service refuses a port it cannot own, says which, and exits non-zero; every
listener binds 127.0.0.1 unless told otherwise. Each case runs the real `vigil` command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from eventbus.broker import EmbeddedBroker
from eventbus.ports import port, port_or_minus_one
from vigil.cli import build_parser

VIGIL = [sys.executable, "-m", "vigil.cli"]
NO_MODEL = ["--model", ""]  # a server without a model version starts in a second


def vigil(*args, timeout=60, env=None):
    return subprocess.run([*VIGIL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def refused(result, address: str, what: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"{what}: cannot listen on {address}: address already in use" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def busy():
    """A port held by a plain listener, with SO_REUSEPORT as grpc's servers set it: a
    listener that does not refuse to share would share it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def started(proc: subprocess.Popen, pattern: str, deadline_s: float = 60) -> re.Match:
    """The first line of proc's output matching pattern; fails if it exits or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    proc.kill()
    pytest.fail(f"no line matching {pattern!r} (exit {proc.wait()}):\n{''.join(lines)}")


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- port numbers --------------------------------------------------------------------------

def test_serve_rejects_a_port_beyond_65535_naming_the_option():
    result = vigil("serve", "--port", "70000", *NO_MODEL)
    assert result.returncode == 2
    assert "argument --port: 70000 is not a port: 0 to 65535" in result.stderr


PORT_OPTIONS = [
    ("serve", "--port"), ("serve", "--metrics-port"), ("serve", "--http-port"),
    ("up", "--port"), ("up", "--metrics-port"), ("up", "--http-port"), ("up", "--broker-port"), ("up", "--processor-metrics-port"),
    ("up", "--alerting-port"), ("up", "--rollout-port"), ("up", "--ui-port"), ("ui", "--port"),
    ("broker", "--port"), ("process", "--metrics-port"), ("alerting", "--admin-port"), ("rollout", "--admin-port"),
]
MINUS_ONE_MEANS_SOMETHING = {("serve", "--metrics-port"), ("up", "--metrics-port"), ("up", "--broker-port"),
                             ("process", "--metrics-port"), ("serve", "--http-port"), ("up", "--http-port")}


@pytest.mark.parametrize("command, option", PORT_OPTIONS)
def test_every_port_option_takes_0_to_65535_only(command, option, capsys):
    parser = build_parser()
    assert getattr(parser.parse_args([command, option, "65535"]), option[2:].replace("-", "_")) == 65535
    lowest = -1 if (command, option) in MINUS_ONE_MEANS_SOMETHING else 0
    for bad in ("65536", "70000", str(lowest - 1), "http"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, option, bad])
        assert f"argument {option}: " in capsys.readouterr().err, (command, option, bad)


def test_every_port_option_of_every_command_uses_the_port_type():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    found = {(name, action.option_strings[0]): action.type
             for name, p in sub.choices.items() for action in p._actions
             if action.option_strings and action.option_strings[0].endswith("-port")}
    assert set(PORT_OPTIONS) <= set(found)
    assert all(kind in (port, port_or_minus_one) for kind in found.values()), found


def test_a_port_beyond_65535_in_the_environment_is_named():
    result = vigil("serve", "--help", env={"VIGIL_PORT": "70000"})
    assert result.returncode != 0
    assert "VIGIL_PORT='70000' is not a valid value for --port" in result.stderr


# -- busy ports ----------------------------------------------------------------------------

def test_a_second_serve_on_a_busy_grpc_port_is_refused():
    first = subprocess.Popen([*VIGIL, "serve", "--port", "0", "--metrics-port", "-1", *NO_MODEL],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = started(first, r"gRPC on 127\.0\.0\.1:(\d+)").group(1)
        second = vigil("serve", "--port", port, "--metrics-port", "-1", *NO_MODEL)
        refused(second, f"127.0.0.1:{port}", "gRPC")
        assert stop(first) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def test_serve_refuses_a_grpc_port_that_would_be_shared(busy):
    refused(vigil("serve", "--port", str(busy), "--metrics-port", "-1", *NO_MODEL), f"127.0.0.1:{busy}", "gRPC")


def test_serve_refuses_a_busy_metrics_port_before_loading_the_model(busy):
    start = time.monotonic()
    result = vigil("serve", "--port", "0", "--metrics-port", str(busy))  # the demo model: not loaded
    refused(result, f"127.0.0.1:{busy}", "metrics")
    assert time.monotonic() - start < 30


def test_serve_metrics_port_minus_one_turns_metrics_off_and_says_so():
    proc = subprocess.Popen([*VIGIL, "serve", "--port", "0", "--metrics-port", "-1", *NO_MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = started(proc, r"gRPC on").string
        assert line.rstrip().endswith("metrics off"), line
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_process_refuses_a_busy_metrics_port(busy):
    result = vigil("process", "--bootstrap-servers", "127.0.0.1:1", "--metrics-port", str(busy))
    refused(result, f"127.0.0.1:{busy}", "metrics")


def test_broker_refuses_a_port_held_by_another_listener(busy):
    refused(vigil("broker", "--port", str(busy)), f"127.0.0.1:{busy}", "broker")


def test_a_second_broker_on_the_port_of_a_running_one_is_refused():
    """The first broker answers Kafka requests on the port, so the second must not take
    its answers for its own."""
    with EmbeddedBroker() as first:
        refused(vigil("broker", "--port", str(first.port)), f"127.0.0.1:{first.port}", "broker")
        assert first.running


def test_up_refuses_a_busy_broker_port_at_once(busy):
    start = time.monotonic()
    result = vigil("up", "--broker-port", str(busy), "--port", "0", "--metrics-port", "0")
    refused(result, f"127.0.0.1:{busy}", "--broker-port")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("option", ["--port", "--metrics-port", "--http-port", "--processor-metrics-port",
                                    "--alerting-port", "--rollout-port", "--ui-port"])
def test_up_refuses_a_busy_port_of_any_service_naming_its_option(option, busy):
    ports = {"--port": "0", "--metrics-port": "0", "--http-port": "0", "--broker-port": "0",
             "--processor-metrics-port": "0", "--alerting-port": "0", "--rollout-port": "0", "--ui-port": "0",
             option: str(busy)}
    result = vigil("up", *[x for pair in ports.items() for x in pair])
    refused(result, f"127.0.0.1:{busy}", option)


def test_alerting_refuses_a_busy_admin_port(kafka_broker, busy):
    result = vigil("alerting", "--bootstrap-servers", kafka_broker.bootstrap_servers, "--admin-port", str(busy))
    refused(result, f"127.0.0.1:{busy}", "--admin-port")
    assert "Unclosed" not in result.stderr, result.stderr


def test_rollout_refuses_a_busy_admin_port(kafka_broker, busy, tmp_path):
    result = vigil("rollout", "--bootstrap-servers", kafka_broker.bootstrap_servers, "--admin-port", str(busy),
                   "--outbox-dir", str(tmp_path))
    refused(result, f"127.0.0.1:{busy}", "--admin-port")
    assert "Unclosed" not in result.stderr, result.stderr

"""The `vigil` command as a user runs it: help, environment variables, and `vigil up`
as a real process that answers over gRPC and shuts down on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
import pytest

from protos import llm_pb2, llm_pb2_grpc
from tests.helpers import ROOT

VIGIL = [sys.executable, "-m", "vigil.cli"]
SERVE_OPTIONS = ["--host", "--port", "--metrics-port", "--model", "--model-name", "--model-version",
                 "--quantize", "--group-size", "--kv-slots", "--max-seq-len", "--max-waiting",
                 "--max-tokens-limit", "--default-max-tokens", "--max-prompt-chars", "--threads"]


def run(*args, env=None, timeout=60):
    return subprocess.run([*VIGIL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_serve_help_documents_every_option_with_its_variable():
    out = run("serve", "--help").stdout
    flat = " ".join(out.split())
    for option in SERVE_OPTIONS:
        var = "VIGIL_" + option[2:].upper().replace("-", "_")
        assert option in out and f"[env {var}]" in flat, option
    assert "(default: 8001)" in flat and "(default: 8002)" in flat


def test_environment_variables_set_defaults():
    out = " ".join(run("serve", "--help", env={"VIGIL_PORT": "9123", "VIGIL_QUANTIZE": "int8"}).stdout.split())
    assert "[env VIGIL_PORT] (default: 9123)" in out
    assert "[env VIGIL_QUANTIZE] (default: int8)" in out


@pytest.mark.parametrize("env, message", [
    ({"VIGIL_PORT": "eighty"}, "VIGIL_PORT='eighty' is not a valid value for --port"),
    ({"VIGIL_QUANTIZE": "int3"}, "VIGIL_QUANTIZE='int3' is not one of none, int8, int4"),
])
def test_bad_environment_values_are_named(env, message):
    result = run("serve", "--help", env=env)
    assert result.returncode != 0
    assert message in result.stderr


def test_a_missing_model_is_a_clear_error():
    result = run("serve", "--model", "/nonexistent/model.gguf", "--port", "0", "--metrics-port", "-1")
    assert result.returncode == 2
    assert "/nonexistent/model.gguf does not exist" in result.stderr


def test_vigil_up_serves_the_demo_model_and_stops_on_sigterm(demo_gguf):
    every_port_free = ["--port", "0", "--metrics-port", "0", "--http-port", "0", "--broker-port", "0",
                       "--processor-metrics-port", "0", "--alerting-port", "0", "--rollout-port", "0",
                       "--ui-port", "0"]
    proc = subprocess.Popen([*VIGIL, "up", *every_port_free], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in proc.stdout:
            match = re.search(r"gRPC on ([\d.]+:\d+)", line)
            if match:
                address = match.group(1)
                break
        assert address, "vigil up never printed its address"
        with grpc.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role="user", content="What is the capital of France?")])
            reply = stub.Generate(llm_pb2.GenerateRequest(model="smollm2-135m-instruct", chat=chat), timeout=120)
        assert "Paris" in reply.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ci_runs_exactly_the_readme_test_command():
    root = ROOT
    assert "make test" in (root / "README.md").read_text()
    assert (root / ".ci/run").read_text().strip().splitlines()[-1] == "exec make test"

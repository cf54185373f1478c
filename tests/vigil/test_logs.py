"""Structured logs: the JSON and text formatters, levels per component, the one line per
request of the inference server (fields, no prompt text unless asked for), and the
`vigil` options that choose them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import threading
import uuid

import grpc
import pytest

from inference.api.events import INFERENCE_TOPIC, MemorySink
from inference.api.options import ServerOptions
from inference.api.server import InferenceServer
from protos import llm_pb2, llm_pb2_grpc
from vigil import logs
from vigil.cli import main

PROMPT = "The secret prompt about a quick brown fox"


def record(name="inference.requests", msg="hello %s", args=("world",), level=logging.INFO, **extra):
    r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_formatter_writes_one_flat_object():
    line = logs.JsonFormatter(service="inference").format(
        record(request_id="r-1", total_seconds=0.25, flags=["a"], tenant="acme"))
    assert "\n" not in line
    d = json.loads(line)
    assert d["message"] == "hello world" and d["level"] == "INFO" and d["logger"] == "inference.requests"
    assert d["service"] == "inference" and d["time"].endswith("Z")
    assert d["request_id"] == "r-1" and d["total_seconds"] == 0.25 and d["flags"] == ["a"] and d["tenant"] == "acme"


def test_json_formatter_keeps_the_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    d = json.loads(logs.JsonFormatter().format(r))
    assert "RuntimeError: boom" in d["exception"] and d["message"] == "failed"


def test_text_formatter_appends_fields():
    line = logs.TextFormatter().format(record(request_id="r-1", error="a b", total_seconds=0.1234567))
    assert line.endswith('INFO inference.requests: hello world request_id=r-1 error="a b" total_seconds=0.123457')


def test_levels_per_component(restore_logging):
    out = io.StringIO()
    logs.configure("json", "INFO", "inference=DEBUG,eventbus=WARNING,requests=ERROR", stream=out)
    logging.getLogger("inference.runtime.engine").debug("shown")
    logging.getLogger("eventbus.publisher").info("hidden")
    logging.getLogger("eventbus.publisher").warning("shown too")
    logging.getLogger("inference.requests").info("hidden: requests are at ERROR")
    logging.getLogger("alerting").debug("hidden: the root is at INFO")
    logging.getLogger("aiokafka").error("hidden: aiokafka is quiet unless named")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["logger"], d["message"]) for d in lines] == [("inference.runtime.engine", "shown"),
                                                            ("eventbus.publisher", "shown too")]


@pytest.mark.parametrize("fmt, level, levels, option", [
    ("yaml", "INFO", "", "--log-format"),
    ("text", "LOUD", "", "--log-level"),
    ("text", "INFO", "inference=LOUD", "--log-levels inference"),
    ("text", "INFO", "inference", "--log-levels"),
    ("text", "INFO", "=DEBUG", "--log-levels"),
])
def test_bad_log_settings_name_the_option(restore_logging, fmt, level, levels, option):
    with pytest.raises(ValueError, match=option):
        logs.configure(fmt, level, levels, stream=io.StringIO())


def test_vigil_refuses_bad_log_levels(restore_logging, capsys):
    assert main(["--log-levels", "inference=LOUD", "fetch-demo"]) == 2
    assert "--log-levels inference: 'LOUD' is not a level" in capsys.readouterr().err


def test_vigil_log_options(restore_logging, capsys, demo_gguf):
    """`vigil --log-format json --log-levels ...`: the root handler writes JSON with the command's name."""
    assert main(["--log-format", "json", "--log-levels", "inference=DEBUG", "fetch-demo"]) == 0
    logging.getLogger("inference.runtime.engine").debug("step %d", 3, extra={"batch": 4})
    logging.getLogger("eventbus").debug("hidden: the root level is INFO")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    mine = [d for d in lines if d["logger"] in ("inference.runtime.engine", "eventbus")]  # not a server's of another test
    assert [(d["message"], d["batch"], d["service"]) for d in mine] == [("step 3", 4, "fetch-demo")]


# -- the per-request line ----------------------------------------------------------------


class Server:
    def __init__(self, options: ServerOptions):
        self.sink = MemorySink()
        self.server = InferenceServer(options, sink=self.sink)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(120)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.llm = llm_pb2_grpc.LLMStub(self.channel)

    def stop(self):
        self.channel.close()
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers(tiny_llama):
    base = dict(model=str(tiny_llama), model_name="tiny", quantize="none", port=0, metrics_port=-1)
    plain, with_text = Server(ServerOptions(**base)), Server(ServerOptions(**base, log_include_text=True))
    yield plain, with_text
    plain.stop()
    with_text.stop()


def request_lines(caplog, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "inference.requests" and getattr(r, "request_id", "") == request_id]


def test_one_line_per_request_without_the_prompt(servers, caplog):
    plain, _ = servers
    caplog.set_level(logging.INFO, logger="inference.requests")
    request_id = f"log-{uuid.uuid4()}"
    trace_id = uuid.uuid4().hex
    plain.llm.Generate(llm_pb2.GenerateRequest(
        model="tiny", request_id=request_id, prompt=PROMPT,
        sampling=llm_pb2.SamplingParams(max_tokens=4, ignore_eos=True)),
        metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")], timeout=60)
    lines = request_lines(caplog, request_id)
    assert len(lines) == 1
    event = next(e for e in plain.sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id)
    d = json.loads(logs.JsonFormatter().format(lines[0]))
    assert d["level"] == "INFO" and d["method"] == "Generate" and d["model"] == "tiny" and d["version"] == "1"
    assert d["route"] == "stable" and d["status"] == "ok" and d["finish_reason"] == "length"
    assert d["prompt_tokens"] == event["prompt_tokens"] > 0 and d["completion_tokens"] == 4
    assert d["trace_id"] == trace_id == event["trace_id"]
    for name in ("queue_seconds", "first_token_seconds", "total_seconds"):
        assert d[name] == pytest.approx(event[name], abs=1e-6)
    assert 0 <= d["queue_seconds"] <= d["first_token_seconds"] <= d["total_seconds"]
    assert "prompt_text" not in d and "completion_text" not in d
    assert "quick brown fox" not in json.dumps(d) and "quick brown fox" not in logs.TextFormatter().format(lines[0])


def test_failed_requests_get_their_line_too(servers, caplog):
    plain, _ = servers
    caplog.set_level(logging.INFO, logger="inference.requests")
    request_id = f"log-{uuid.uuid4()}"
    with pytest.raises(grpc.RpcError):
        plain.llm.Generate(llm_pb2.GenerateRequest(model="tiny", request_id=request_id, prompt=""), timeout=30)
    (line,) = request_lines(caplog, request_id)
    assert line.status == "invalid_argument" and line.error.startswith("prompt:")


def test_prompt_text_only_when_asked_for(servers, caplog):
    _, with_text = servers
    caplog.set_level(logging.INFO, logger="inference.requests")
    request_id = f"log-{uuid.uuid4()}"
    reply = with_text.llm.Generate(llm_pb2.GenerateRequest(
        model="tiny", request_id=request_id, prompt=PROMPT, sampling=llm_pb2.SamplingParams(max_tokens=3)),
        timeout=60)
    (line,) = request_lines(caplog, request_id)
    assert line.prompt_text == PROMPT and line.completion_text == reply.text
    event = next(e for e in with_text.sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id)
    assert "prompt_text" not in event  # the log's option does not put text in events


def test_request_lines_off_by_level(servers, caplog):
    plain, _ = servers
    caplog.set_level(logging.WARNING, logger="inference.requests")
    request_id = f"log-{uuid.uuid4()}"
    plain.llm.Generate(llm_pb2.GenerateRequest(model="tiny", request_id=request_id, prompt="hi",
                                               sampling=llm_pb2.SamplingParams(max_tokens=2)), timeout=60)
    assert request_lines(caplog, request_id) == []

"""The HTTP front as its users see it: the real `openai` client (sync, async, streaming)
against a server of the tiny random model on loopback, raw HTTP for what that client
would never send, and the same events, traces, metrics, keys and limits as gRPC."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import aiohttp
import grpc
import openai
import pytest

from inference.api.events import INFERENCE_TOPIC
from inference.api.http_front import Ask, EventStream, ReaderGone
from inference.api.limits import Limits
from inference.api.options import EngineOptions
from inference.api.requests import Call
from eventbus.apikeys import AuthOptions, hash_secret
from inference.edge.tracing import Tracing
from inference.runtime.engine import Job
from inference.runtime.sampling import SamplingParams
from protos import llm_pb2, llm_pb2_grpc
from tests.helpers.serving import metric
from tests.helpers.waiting import until, wait_until

MODEL = "tiny"
MAX_TOKENS, MAX_PROMPT_CHARS = 64, 400
CHAT = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(start_server, tiny_llama):
    return start_server(model=str(tiny_llama), model_name=MODEL, quantize="none", http_port=0,
                        limits=Limits(max_tokens=MAX_TOKENS, max_prompt_chars=MAX_PROMPT_CHARS),
                        engine=EngineOptions(kv_slots=4, max_seq_len=1024, max_waiting=8))


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=base_url(server) + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def events_of(sink, request_id: str) -> list[dict]:
    return [e for e in sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]


def one_event(server, request_id: str) -> dict:
    """The request's one event (waited for: it is recorded as the response goes out)."""
    events = wait_until(lambda: events_of(server.sink, request_id), 10, f"the event of {request_id}")
    assert len(events) == 1, events
    return events[0]


def post(server, path: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
    """Raw HTTP: status, headers, JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base_url(server) + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# -- the openai client -------------------------------------------------------------------


def test_chat_completion_with_the_sync_client_is_one_event(server, client):
    r = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0,
                                                         extra_headers={"x-request-id": "http-chat-1"})
    completion = r.parse()
    assert r.headers["x-request-id"] == "http-chat-1"
    assert completion.id == "chatcmpl-http-chat-1" and completion.object == "chat.completion"
    assert completion.model == MODEL and len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    event = one_event(server, "http-chat-1")
    assert event["method"] == "openai.chat.completions" and event["status"] == "ok"
    assert event["model"] == MODEL and event["version"] == "1" and event["route"] == "stable"
    assert event["prompt_tokens"] == completion.usage.prompt_tokens
    assert event["completion_tokens"] == completion.usage.completion_tokens


def test_greedy_text_is_the_same_over_http_and_grpc(server, client):
    prompt = "The quick brown fox"
    text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    with grpc.insecure_channel(server.address) as channel:
        answer = llm_pb2_grpc.LLMStub(channel).Generate(llm_pb2.GenerateRequest(
            model=MODEL, prompt=prompt, sampling=llm_pb2.SamplingParams(max_tokens=8, ignore_eos=True)), timeout=60)
    assert text == answer.text


def test_async_client_n_choices_with_a_seed_and_logprobs(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="unused", max_retries=0) as c:
            return await c.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, n=3,
                                                   temperature=1.0, seed=7, logprobs=True,
                                                   extra_headers={"x-request-id": "http-n"},
                                                   extra_body={"ignore_eos": True})
    r = asyncio.run(go())
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.finish_reason == "length"
        tokens = c.logprobs.content
        assert len(tokens) == 5 and all(t.logprob <= 0 and t.top_logprobs == [] for t in tokens)
    assert r.usage.completion_tokens == 15
    events = [one_event(server, f"http-n-{i}") for i in range(3)]  # one request of the engine per choice
    assert all(e["status"] == "ok" and e["completion_tokens"] == 5 for e in events)
    # the logprobs are those the event's confidence summary is made of
    for c, e in zip(r.choices, events):
        mean = sum(t.logprob for t in c.logprobs.content) / 5
        assert mean == pytest.approx(e["mean_logprob"], abs=1e-4)


def test_streaming_with_the_sync_client_ends_with_usage(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"x-request-id": "http-stream"},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert text == whole.choices[0].message.content
    event = one_event(server, "http-stream")
    assert event["method"] == "openai.chat.completions" and event["completion_tokens"] == 12


def test_streamed_completions_with_the_async_client(server):
    async def go():
        async with openai.AsyncOpenAI(base_url=base_url(server) + "/v1", api_key="unused", max_retries=0) as c:
            stream = await c.completions.create(model=MODEL, prompt="Once upon", max_tokens=6, temperature=0,
                                                stream=True, logprobs=0, extra_body={"ignore_eos": True})
            return [chunk async for chunk in stream]
    chunks = asyncio.run(go())
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    tokens = [t for c in chunks for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])]
    assert len(tokens) == 6


def test_the_raw_stream_ends_with_done(server):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(base_url(server) + "/v1/completions", json={
                    "model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
                assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                return (await r.read()).decode()
    body = asyncio.run(go())
    events = [block for block in body.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_models(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_an_unknown_model_is_404_and_one_event(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT,
                                       extra_headers={"x-request-id": "http-404"})
    assert e.value.body["param"] == "model" and "no-such-model" in e.value.body["message"]
    assert one_event(server, "http-404")["status"] == "not_found"


# -- malformed requests, raw -----------------------------------------------------------

OK_CHAT = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
OK_PROMPT = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}

BAD = [  # (path, body, status, error type, param)
    ("/v1/chat/completions", b"{not json", 400, "invalid_request_error", "body"),
    ("/v1/chat/completions", [1, 2], 400, "invalid_request_error", "body"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "invalid_request_error", "model"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": []}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_request_error", "messages[0].role"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_request_error", "messages[0].content[0].type"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, 400,
     "invalid_request_error", "messages[0].tool_calls"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": MAX_TOKENS + 1}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": "5"}, 400, "invalid_request_error", "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}, 400,
     "invalid_request_error", "max_completion_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": 3}, 400, "invalid_request_error",
     "max_completion_tokens"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": -1}, 400, "invalid_request_error", "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "temperature": True}, 400, "invalid_request_error", "temperature"),
    ("/v1/chat/completions", {**OK_CHAT, "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("/v1/chat/completions", {**OK_CHAT, "seed": -1}, 400, "invalid_request_error", "seed"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": 5}, 400, "invalid_request_error", "stop"),
    ("/v1/chat/completions", {**OK_CHAT, "stop": ["a", ""]}, 400, "invalid_request_error", "stop[1]"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 0}, 400, "invalid_request_error", "n"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 99}, 400, "invalid_request_error", "n"),
    ("/v1/chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": 2}, 400, "invalid_request_error",
     "top_logprobs"),
    ("/v1/chat/completions", {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, "invalid_request_error",
     "stream_options"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "invalid_request_error", "tools"),
    ("/v1/chat/completions", {**OK_CHAT, "frequency_penalty": 0.5}, 400, "invalid_request_error",
     "frequency_penalty"),
    ("/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "json_object"}}, 400, "invalid_request_error",
     "response_format"),
    ("/v1/chat/completions", {**OK_CHAT, "logit_bias": {"5": 10}}, 400, "invalid_request_error", "logit_bias"),
    ("/v1/chat/completions", {**OK_CHAT, "colour": "blue"}, 400, "invalid_request_error", "colour"),
    ("/v1/chat/completions", {**OK_CHAT, "user": "u" * 300}, 400, "invalid_request_error", "user"),
    ("/v1/chat/completions", {**OK_CHAT, "messages": [{"role": "user", "content": "x" * (MAX_PROMPT_CHARS + 1)}]},
     400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "no-such-model"}, 404, "invalid_request_error", "model"),
    ("/v1/completions", {"model": MODEL}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**OK_PROMPT, "prompt": ""}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**OK_PROMPT, "prompt": ["a", "b"]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**OK_PROMPT, "prompt": [1, 2, 3]}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {**OK_PROMPT, "logprobs": 3}, 400, "invalid_request_error", "logprobs"),
    ("/v1/completions", {**OK_PROMPT, "echo": True}, 400, "invalid_request_error", "echo"),
    ("/v1/completions", {**OK_PROMPT, "best_of": 3}, 400, "invalid_request_error", "best_of"),
    ("/v1/completions", {**OK_PROMPT, "messages": CHAT}, 400, "invalid_request_error", "messages"),
    ("/v1/completions", {**OK_PROMPT, "model": "no-such-model"}, 404, "invalid_request_error", "model"),
]


@pytest.mark.parametrize("case", range(len(BAD)),
                         ids=[f"{'chat' if path == '/v1/chat/completions' else 'prompt'}-{param}-{status}"
                              for path, _, status, _, param in BAD])
def test_bad_input_gets_its_status_its_field_and_one_event(server, case):
    path, body, status, kind, param = BAD[case]
    request_id = f"http-bad-{case}"
    code, headers, answer = post(server, path, body, {"x-request-id": request_id})
    assert code == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind and error["param"] == param, error
    assert error["message"].startswith(param), error
    event = one_event(server, request_id)
    assert event["status"] == ("not_found" if status == 404 else "invalid_argument")
    assert event["method"] == ("openai.chat.completions" if path.endswith("chat/completions") else
                               "openai.completions")


def test_ignorable_fields_are_accepted(server):
    code, _, answer = post(server, "/v1/chat/completions", {
        **OK_CHAT, "metadata": {"a": "b"}, "store": False, "frequency_penalty": 0, "presence_penalty": 0.0,
        "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none", "user": "someone",
        "top_logprobs": 0, "n": 1, "stop": None, "messages": [{"role": "developer", "content": "Be brief."},
                                                                {"role": "user", "content": [{"type": "text",
                                                                                              "text": "Hi"}]}]})
    assert code == 200, answer


@pytest.mark.parametrize("method, path, status", [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                                  ("DELETE", "/v1/models", 405)])
def test_unknown_paths_and_methods_answer_in_the_error_shape(server, method, path, status):
    request = urllib.request.Request(base_url(server) + path, method=method)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == status
    assert set(json.loads(e.value.read())["error"]) == {"message", "type", "param", "code"}


def test_a_body_too_large_is_413(server):
    code, _, answer = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * (2 << 20)})
    assert code == 413 and answer["error"]["type"] == "invalid_request_error"


# -- events, traces, metrics -----------------------------------------------------------


def test_traceparent_gives_the_event_its_trace_id(server, client):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_headers={
        "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "x-request-id": "http-traced"})
    assert one_event(server, "http-traced")["trace_id"] == trace_id


def test_an_http_request_is_a_server_span_named_by_its_route(server, client):
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter, provider = InMemorySpanExporter(), TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    serving = server.server.serving
    untraced, serving.tracing = serving.tracing, Tracing(provider)
    try:
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body={"ignore_eos": True},
                                       extra_headers={"traceparent": traceparent, "x-request-id": "http-span"})
        spans = wait_until(lambda: {s.name: s for s in exporter.get_finished_spans()
                                    if s.attributes.get("vigil.request_id") == "http-span"}, 10, "the request's span")
    finally:
        serving.tracing = untraced
    span = spans["POST /v1/chat/completions"]
    assert span.kind == trace.SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"
    assert span.attributes["http.route"] == "/v1/chat/completions"
    assert span.attributes["http.response.status_code"] == 200
    assert {"queue", "prefill", "decode"} <= {s.name for s in exporter.get_finished_spans()
                                              if s.parent and s.parent.span_id == span.context.span_id}


def test_requests_count_with_their_protocol(server, client):
    url = server.metrics_url
    labels = dict(model=MODEL, version="1", method="openai.completions", status="ok", protocol="http")
    before = metric(url, "vigil_requests_total", **labels)
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert metric(url, "vigil_requests_total", **labels) == before + 1
    with grpc.insecure_channel(server.address) as channel:
        llm_pb2_grpc.LLMStub(channel).Generate(llm_pb2.GenerateRequest(
            model=MODEL, prompt="Hi", sampling=llm_pb2.SamplingParams(max_tokens=2)), timeout=60)
    assert metric(url, "vigil_requests_total", model=MODEL, method="Generate", protocol="grpc") >= 1


# -- leaving early, a full queue -------------------------------------------------------


class Gate:
    """Holds the compute thread at the next token of any generation until opened: the
    engine's inter-token hook, wrapped."""

    def __init__(self, engine):
        self.engine, self.hook = engine, engine.on_token
        self.open, self.held = threading.Event(), threading.Event()
        engine.on_token = self.on_token

    def on_token(self, gap: float) -> None:
        self.held.set()
        self.open.wait(30)
        if self.hook is not None:
            self.hook(gap)

    def release(self) -> None:
        self.engine.on_token = self.hook
        self.open.set()


def test_a_client_that_leaves_mid_stream_stops_its_generation(server):
    engine = server.server.router.get(MODEL, "1").engine

    async def go():
        gate = Gate(engine)
        try:
            async with aiohttp.ClientSession() as s:
                response = await s.post(base_url(server) + "/v1/completions", headers={"x-request-id": "http-left"},
                                        json={"model": MODEL, "prompt": "Hi", "max_tokens": MAX_TOKENS,
                                              "stream": True, "ignore_eos": True})
                assert response.status == 200
                await response.content.readuntil(b"\n\n")  # the first chunk came; the engine is held at the next
                await until(gate.held.is_set, 10, "the engine held at the second token")
                response.close()  # the client leaves
            event = await until(lambda: events_of(server.sink, "http-left"), 10, "the event of the stream")
            steps = engine.stats.steps
        finally:
            gate.release()
        await until(lambda: engine.stats.running == 0, 10, "the generation stopped")
        return event[0], engine.stats.steps - steps

    event, steps = asyncio.run(go())
    assert event["status"] == "cancelled"
    assert steps <= 2  # the step that was held, and the next, which drops the cancelled job


def test_a_full_queue_is_503_at_once(start_server, tiny_llama):
    s = start_server(model=str(tiny_llama), model_name=MODEL, quantize="none", http_port=0,
                     engine=EngineOptions(kv_slots=1, max_seq_len=128, max_waiting=0))
    engine = s.server.router.get(MODEL, "1").engine
    gate = Gate(engine)
    try:  # a generation holds the only KV slot, stopped at its second token
        engine.submit(Job([1, 2, 3], lambda update: None, params=SamplingParams(max_tokens=4, ignore_eos=True)))
        wait_until(gate.held.is_set, 10, "the engine held")
        code, headers, answer = post(s, "/v1/chat/completions", {**OK_CHAT, "max_tokens": 2},
                                     {"x-request-id": "http-full"})
    finally:
        gate.release()
    assert code == 503, answer
    assert answer["error"]["type"] == "server_error" and answer["error"]["code"] == "overloaded"
    assert headers["Retry-After"] == "1"
    assert one_event(s, "http-full")["status"] == "resource_exhausted"


def test_a_reader_that_takes_nothing_is_cut_off():
    """The stream waits for the socket to drain before its next event; past the stall
    limit the connection is closed and the stream ends (its generation with it)."""
    class Stuck:  # a response whose socket never drains
        async def write(self, data):
            await asyncio.Event().wait()

    class Transport:
        closed = False

        def get_write_buffer_size(self):
            return 1 << 16  # the reader is behind

        def close(self):
            self.closed = True

    request = SimpleNamespace(transport=Transport())
    out = EventStream(request, "/v1/chat/completions", Call("openai.chat.completions", "stuck"), Ask([]), 0.05)
    out.response = Stuck()
    with pytest.raises(ReaderGone):
        asyncio.run(out.write(None))
    assert request.transport.closed


# -- keys and limits -------------------------------------------------------------------

SECRETS = {"web": "vgk_http-test-web-secret", "paced": "vgk_http-test-paced-secret"}


@pytest.fixture(scope="module")
def keyed(start_server, tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("http-keys") / "keys.yml"
    path.write_text(f"- name: web\n  tenant: acme\n  sha256: {hash_secret(SECRETS['web'])}\n"
                    f"- name: paced\n  tenant: slow\n  sha256: {hash_secret(SECRETS['paced'])}\n"
                    "  requests_per_second: 0.01\n  burst: 1\n")
    return start_server(model=str(tiny_llama), model_name=MODEL, quantize="none", http_port=0,
                        auth=AuthOptions(keys_file=str(path)))


def keyed_client(server, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(server) + "/v1", api_key=secret, max_retries=0, timeout=60)


def test_a_valid_key_is_served_and_its_tenant_recorded(keyed):
    with keyed_client(keyed, SECRETS["web"]) as c:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"x-request-id": "http-key"})
        assert [m.id for m in c.models.list().data] == [MODEL]
    assert one_event(keyed, "http-key")["tenant"] == "acme"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer vgk_not-a-key"}, {"Authorization": "Basic abc"}])
def test_no_or_a_bad_key_is_401_and_no_event(keyed, headers):
    code, answer_headers, answer = post(keyed, "/v1/chat/completions", OK_CHAT,
                                        {**headers, "x-request-id": "http-401"})
    assert code == 401, answer
    assert answer["error"]["code"] == "invalid_api_key" and answer["error"]["message"].startswith("authorization")
    assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    assert events_of(keyed.sink, "http-401") == []


def test_the_openai_client_with_a_bad_key_gets_authentication_error(keyed):
    with keyed_client(keyed, "vgk_wrong") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_over_a_keys_limit_is_429_with_retry_after(keyed):
    with keyed_client(keyed, SECRETS["paced"]) as c:
        c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)  # the burst of one
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"x-request-id": "http-429"})
    assert e.value.status_code == 429
    assert int(e.value.response.headers["Retry-After"]) >= 1
    assert e.value.body["code"] == "rate_limit_exceeded" and "requests per second" in e.value.body["message"]
    assert events_of(keyed.sink, "http-429") == []  # refused at the edge, as on gRPC

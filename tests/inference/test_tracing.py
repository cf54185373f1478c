"""Traces over real gRPC: a server of the tiny random Llama on loopback, spans recorded
by the OpenTelemetry SDK's in-memory exporter; the span tree, the caller's traceparent,
trace ids in event, log line and span agreeing; export by OTLP to a collector running
in the test; and nothing recorded when tracing is off."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent import futures

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from inference.api.events import INFERENCE_TOPIC, MemorySink
from inference.api.options import ServerOptions
from inference.api.server import InferenceServer
from inference.edge.tracing import TracingOptions, caller_trace_id
from protos import llm_pb2, llm_pb2_grpc

MODEL = "tiny"
CALLER_SPAN = "00f067aa0ba902b7"


def caller() -> tuple[str, str]:
    """A fresh caller trace id and the traceparent that carries it."""
    trace_id = uuid.uuid4().hex
    return trace_id, f"00-{trace_id}-{CALLER_SPAN}-01"


class TracedServer:
    """An InferenceServer with a tracer provider of the test's, in a thread of its own."""

    def __init__(self, options: ServerOptions, provider=None):
        self.sink = MemorySink()
        self.server = InferenceServer(options, sink=self.sink, tracer_provider=provider)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.channel = grpc.insecure_channel(self.address)
        self.llm = llm_pb2_grpc.LLMStub(self.channel)

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def event(self, request_id: str, timeout: float = 5.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.sink.events(INFERENCE_TOPIC) if e["request_id"] == request_id]
            if found:
                assert len(found) == 1
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"no event for {request_id}")

    def stop(self) -> None:
        self.channel.close()
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def options(model_dir, **kw) -> ServerOptions:
    return ServerOptions(model=str(model_dir), model_name=MODEL, quantize="none", port=0, metrics_port=-1, **kw)


@pytest.fixture(scope="module")
def exporter():
    return InMemorySpanExporter()


@pytest.fixture(scope="module")
def traced(tiny_llama, exporter):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    s = TracedServer(options(tiny_llama), provider)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def untraced(tiny_llama):
    s = TracedServer(options(tiny_llama))
    yield s
    s.stop()


def rid() -> str:
    return f"trace-{uuid.uuid4()}"


def spans_of(exporter, trace_id: str, want: int, timeout: float = 5.0) -> dict[str, object]:
    """The finished spans of a trace by name, once `want` of them have ended."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in exporter.get_finished_spans() if format_trace_id(s.context.trace_id) == trace_id]
        if len(spans) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    by_name = {}
    for s in spans:
        assert s.name not in by_name, f"two spans named {s.name}"
        by_name[s.name] = s
    return by_name


def generate(server, metadata=(), tokens: int = 6, **kw) -> tuple[str, llm_pb2.GenerateResponse]:
    request_id = rid()
    reply = server.llm.Generate(llm_pb2.GenerateRequest(
        model=MODEL, request_id=request_id, prompt="The quick brown fox",
        sampling=llm_pb2.SamplingParams(max_tokens=tokens, ignore_eos=True), **kw), metadata=metadata, timeout=60)
    return request_id, reply


def test_span_tree_continues_the_callers_trace(traced, exporter, caplog):
    caplog.set_level(logging.INFO, logger="inference.requests")
    CALLER_TRACE, TRACEPARENT = caller()
    request_id, reply = generate(traced, metadata=[("traceparent", TRACEPARENT)])
    assert reply.completion_tokens == 6
    event = traced.event(request_id)
    assert event["trace_id"] == CALLER_TRACE  # the event joins the caller's trace

    spans = spans_of(exporter, CALLER_TRACE, 5)
    assert set(spans) == {"vigil.v1.LLM/Generate", "queue", "prefill", "decode", f"publish {INFERENCE_TOPIC}"}
    root = spans["vigil.v1.LLM/Generate"]
    assert root.kind == SpanKind.SERVER
    assert root.parent is not None and format_span_id(root.parent.span_id) == CALLER_SPAN  # from traceparent
    assert root.parent.is_remote
    for name in ("queue", "prefill", "decode", f"publish {INFERENCE_TOPIC}"):
        assert spans[name].parent.span_id == root.context.span_id, name
    assert spans[f"publish {INFERENCE_TOPIC}"].kind == SpanKind.PRODUCER

    a = root.attributes
    assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Generate" and a["rpc.service"] == "vigil.v1.LLM"
    assert a["vigil.request_id"] == request_id and a["vigil.model"] == MODEL and a["vigil.version"] == "1"
    assert a["vigil.status"] == "ok" and a["rpc.grpc.status_code"] == 0
    assert a["gen_ai.usage.output_tokens"] == 6 and a["gen_ai.usage.input_tokens"] == event["prompt_tokens"]
    assert spans["decode"].attributes["vigil.tokens"] == 5

    # the stages follow each other inside the request, as the engine timed them
    q, p, d = spans["queue"], spans["prefill"], spans["decode"]
    assert root.start_time <= q.start_time <= q.end_time <= p.start_time + 1000
    assert p.start_time <= p.end_time <= d.start_time + 1000 and d.start_time <= d.end_time <= root.end_time
    ns = 1e9
    assert abs((q.end_time - q.start_time) / ns - event["queue_seconds"]) < 1e-3
    assert abs((p.end_time - q.start_time) / ns - event["first_token_seconds"]) < 1e-3
    assert abs((d.end_time - q.start_time) / ns - event["total_seconds"]) < 1e-3
    assert abs(reply.timing.total_seconds - event["total_seconds"]) < 1e-6

    # the request's log line carries the same trace id, and its span's id
    lines = [r for r in caplog.records if r.name == "inference.requests" and getattr(r, "request_id", "") == request_id]
    assert len(lines) == 1
    line = lines[0]
    assert line.trace_id == CALLER_TRACE and line.span_id == format_span_id(root.context.span_id)
    assert line.status == "ok" and line.model == MODEL and line.completion_tokens == 6


def test_new_trace_without_traceparent(traced, exporter):
    request_id, _ = generate(traced)
    event = traced.event(request_id)
    trace_id = event["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    spans = spans_of(exporter, trace_id, 5)
    root = spans["vigil.v1.LLM/Generate"]
    assert root.parent is None and root.attributes["vigil.request_id"] == request_id


def test_a_malformed_traceparent_starts_a_new_trace(traced, exporter):
    request_id, _ = generate(traced, metadata=[("traceparent", "00-zzzz-not-a-trace")])
    trace_id = traced.event(request_id)["trace_id"]
    assert len(trace_id) == 32 and int(trace_id, 16)
    assert spans_of(exporter, trace_id, 5)["vigil.v1.LLM/Generate"].parent is None


def test_stream_kserve_and_classify_spans(traced, exporter):
    request_id = rid()
    parts = list(traced.llm.GenerateStream(llm_pb2.GenerateRequest(
        model=MODEL, request_id=request_id, prompt="Once upon a time",
        sampling=llm_pb2.SamplingParams(max_tokens=4, ignore_eos=True)), timeout=60))
    assert parts[-1].final
    spans = spans_of(exporter, traced.event(request_id)["trace_id"], 5)
    assert "vigil.v1.LLM/GenerateStream" in spans and "decode" in spans

    client = triton.InferenceServerClient(traced.address)
    prompt = triton.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
    max_tokens = triton.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([3], dtype=np.int32))
    kserve_id = rid()
    CALLER_TRACE, TRACEPARENT = caller()
    client.infer(MODEL, [prompt, max_tokens], request_id=kserve_id, headers={"traceparent": TRACEPARENT})
    spans = spans_of(exporter, traced.event(kserve_id)["trace_id"], 5)
    assert traced.event(kserve_id)["trace_id"] == CALLER_TRACE
    assert "inference.GRPCInferenceService/ModelInfer" in spans

    classify_id = rid()
    traced.llm.Classify(llm_pb2.ClassifyRequest(model=MODEL, request_id=classify_id, text="Paris is",
                                                labels=["a city", "a fox"]), timeout=60)
    spans = spans_of(exporter, traced.event(classify_id)["trace_id"], 4)
    assert set(spans) == {"vigil.v1.LLM/Classify", "queue", "score", f"publish {INFERENCE_TOPIC}"}


def test_a_refused_request_has_its_span_and_status(traced, exporter):
    request_id = rid()
    with pytest.raises(grpc.RpcError) as err:
        traced.llm.Generate(llm_pb2.GenerateRequest(model="no-such-model", request_id=request_id, prompt="x"),
                            metadata=[("traceparent", f"00-{'ab' * 16}-{CALLER_SPAN}-01")], timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    event = traced.event(request_id)
    assert event["trace_id"] == "ab" * 16
    spans = spans_of(exporter, "ab" * 16, 2)
    assert set(spans) == {"vigil.v1.LLM/Generate", f"publish {INFERENCE_TOPIC}"}  # never reached the engine
    root = spans["vigil.v1.LLM/Generate"]
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert root.status.status_code != StatusCode.ERROR  # the caller's mistake, not the server's


def test_tracing_off_records_nothing_but_keeps_the_callers_trace_id(untraced, exporter):
    assert not untraced.server.tracing.enabled
    CALLER_TRACE, TRACEPARENT = caller()
    before = len(exporter.get_finished_spans())
    request_id, _ = generate(untraced, metadata=[("traceparent", TRACEPARENT)])
    assert untraced.event(request_id)["trace_id"] == CALLER_TRACE
    request_id, _ = generate(untraced)
    assert untraced.event(request_id)["trace_id"] == ""
    assert len(exporter.get_finished_spans()) == before


def test_caller_trace_id_rejects_invalid_headers():
    CALLER_TRACE, TRACEPARENT = caller()
    assert caller_trace_id({"traceparent": TRACEPARENT}) == CALLER_TRACE
    assert caller_trace_id({"traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01"}) == ""
    assert caller_trace_id({"traceparent": f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01"}) == ""
    assert caller_trace_id({"traceparent": f"00-{CALLER_TRACE}-{'0' * 16}-01"}) == ""
    assert caller_trace_id({}) == ""


def test_bad_tracing_options_name_the_option():
    with pytest.raises(ValueError, match="--trace-sample-ratio"):
        TracingOptions(sample_ratio=1.5).check()
    with pytest.raises(ValueError, match="--otlp-endpoint"):
        TracingOptions(otlp_endpoint="not an endpoint").check()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_exported_by_otlp(tiny_llama):
    collector = Collector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        s = TracedServer(options(tiny_llama, tracing=TracingOptions(
            otlp_endpoint=f"http://127.0.0.1:{port}", service_name="vigil-test")))
        try:
            assert s.server.tracing.enabled
            CALLER_TRACE, TRACEPARENT = caller()
            request_id, _ = generate(s, metadata=[("traceparent", TRACEPARENT)])
        finally:
            s.stop()  # flushes the batch processor
        spans, services = [], set()
        for req in collector.requests:
            for rs in req.resource_spans:
                services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
                for ss in rs.scope_spans:
                    spans.extend(ss.spans)
        assert services == {"vigil-test"}
        ours = [sp for sp in spans if sp.trace_id.hex() == CALLER_TRACE]
        assert {sp.name for sp in ours} >= {"vigil.v1.LLM/Generate", "queue", "prefill", "decode"}
        root = next(sp for sp in ours if sp.name == "vigil.v1.LLM/Generate")
        assert root.parent_span_id.hex() == CALLER_SPAN
        assert {a.key: a.value.string_value for a in root.attributes}["vigil.request_id"] == request_id
    finally:
        grpc_server.stop(0)


def test_publish_span_ends_at_the_brokers_acknowledgement(tiny_llama, kafka_broker, tmp_path):
    from inference.api.options import EventOptions

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    events = EventOptions(bootstrap_servers=kafka_broker.bootstrap_servers, outbox_dir=str(tmp_path / "outbox"))
    server = InferenceServer(options(tiny_llama, events=events), tracer_provider=provider)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(120)
    try:
        trace_id, traceparent = caller()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            llm_pb2_grpc.LLMStub(channel).Generate(llm_pb2.GenerateRequest(
                model=MODEL, prompt="The quick brown fox",
                sampling=llm_pb2.SamplingParams(max_tokens=3, ignore_eos=True)),
                metadata=[("traceparent", traceparent)], timeout=60)
        spans = spans_of(exporter, trace_id, 5, timeout=15)
        publish = spans[f"publish {INFERENCE_TOPIC}"]
        assert publish.attributes["messaging.system"] == "kafka"
        assert "vigil.outcome" not in publish.attributes  # acknowledged, not spilled or lost
        assert publish.start_time >= spans["decode"].end_time
        assert publish.end_time > publish.start_time  # a broker round trip, not an append to a queue
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

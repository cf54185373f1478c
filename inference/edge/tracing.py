"""Traces of requests (OpenTelemetry): one span per request, with a child span per stage.

    vigil.v1.LLM/Generate                 SERVER, from the handler's start to the request's end
    ├── queue                             waiting for a KV slot (engine: arrival -> admitted)
    ├── prefill                           the prompt's forward pass and the first token
    ├── decode                            second token to the last (absent with one token)
    └── publish vigil.inference.events    PRODUCER, from the request's end to the broker's
                                          acknowledgement (or the outbox); may end after its parent

Classify has `score` (prompt and labels) instead of prefill and decode. The stage spans
are made when the request ends, from the engine's own timestamps (inference.runtime.engine's
Timing, relative to the job's arrival), so the engine's thread never touches
OpenTelemetry and a decode step costs nothing more.

A request continues the caller's trace when the caller's metadata has a `traceparent`
(W3C Trace Context; the global propagator, so OTEL_PROPAGATORS can add others). The
trace id goes into the request's record, hence into its event (InferenceEvent.trace_id)
and its log line. (A shadow copy runs in a context of its own, serving.shadow: it starts
a trace of its own.)

Off by default: `Tracing()` has no tracer, imports nothing of OpenTelemetry, and only
reads a `traceparent` so that the caller's trace id is still in the event and the log.
On (`--otlp-endpoint`), spans go through a batch processor to an OTLP/gRPC exporter;
the exporter's OTEL_EXPORTER_OTLP_* variables (headers, certificate, compression,
timeout) apply. Tests and benchmarks hand in a provider of their own.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

SERVICES = {"Generate": "vigil.v1.LLM", "GenerateStream": "vigil.v1.LLM", "Classify": "vigil.v1.LLM",
            "ModelInfer": "inference.GRPCInferenceService", "ModelStreamInfer": "inference.GRPCInferenceService"}
HTTP_ROUTES = {"openai.chat.completions": "/v1/chat/completions", "openai.completions": "/v1/completions"}
HTTP_STATUS = {"ok": 200, "invalid_argument": 400, "unauthenticated": 401, "permission_denied": 403,
               "not_found": 404, "resource_exhausted": 503, "cancelled": 499, "deadline_exceeded": 504,
               "internal": 500}
GRPC_CODES = {"ok": 0, "cancelled": 1, "invalid_argument": 3, "deadline_exceeded": 4, "not_found": 5,
              "permission_denied": 7, "resource_exhausted": 8, "internal": 13, "unauthenticated": 16}
SERVER_ERRORS = {"internal", "deadline_exceeded"}  # a failure of the server, not of the caller
TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
ZERO_TRACE = "0" * 32


@dataclass
class TracingOptions:
    otlp_endpoint: str = ""      # empty: no spans recorded or exported; e.g. http://127.0.0.1:4317
    service_name: str = "vigil-inference"
    sample_ratio: float = 1.0    # of new traces; a caller's sampling decision is followed

    def check(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"--trace-sample-ratio: {self.sample_ratio} is not between 0 and 1")
        if self.otlp_endpoint and not re.match(r"^(https?://)?[^\s/]+(:\d+)?/?$", self.otlp_endpoint):
            raise ValueError(f"--otlp-endpoint: {self.otlp_endpoint!r} is not HOST:PORT or http(s)://HOST:PORT")


class RequestSpan:
    """A request's span and the clock pair that maps monotonic times onto it."""
    __slots__ = ("span", "mono", "wall_ns")

    def __init__(self, span, mono: float, wall_ns: int):
        self.span, self.mono, self.wall_ns = span, mono, wall_ns

    def ns(self, mono: float) -> int:
        return self.wall_ns + int((mono - self.mono) * 1e9)


def caller_trace_id(metadata: Mapping[str, str]) -> str:
    """The trace id of a valid W3C traceparent, else ""."""
    m = TRACEPARENT.fullmatch(metadata.get("traceparent", "").strip().lower())
    if m is None or m.group(1) == "ff" or m.group(2) == ZERO_TRACE or m.group(3) == "0" * 16:
        return ""
    return m.group(2)


class Tracing:
    """The server's tracer; `Tracing()` is off."""

    def __init__(self, provider=None, owned: bool = False):
        self.provider = provider
        self.owned = owned  # shut down with the server (made here, not handed in)
        self.tracer = None
        if provider is not None:
            from opentelemetry import propagate, trace

            self.trace, self.propagate = trace, propagate
            self.tracer = provider.get_tracer("vigil.inference")

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def from_options(cls, o: TracingOptions, instance: str = "") -> "Tracing":
        o.check()
        if not o.otlp_endpoint:
            return cls()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        attributes = {"service.name": o.service_name}
        if instance:
            attributes["service.instance.id"] = instance
        provider = TracerProvider(resource=Resource.create(attributes),
                                  sampler=ParentBased(TraceIdRatioBased(o.sample_ratio)))
        # a bare HOST:PORT is plaintext, as the README says; the exporter alone would take it for TLS
        endpoint = o.otlp_endpoint if "://" in o.otlp_endpoint else f"http://{o.otlp_endpoint}"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("traces to %s by OTLP/gRPC (service %s, sampling %g of new traces)",
                 o.otlp_endpoint, o.service_name, o.sample_ratio)
        return cls(provider, owned=True)

    def shutdown(self) -> None:
        """Export what is left (owned providers only)."""
        if self.owned and self.provider is not None:
            self.provider.shutdown()

    # -- a request's life ---------------------------------------------------------------

    def begin(self, out, metadata: Mapping[str, str] | None) -> None:
        """Start the request's span (when on) and set out.trace_id; the parent is the
        caller's traceparent, if any. metadata: the caller's headers, keys in lower case;
        None for a request the server made itself (a shadow copy)."""
        if self.tracer is None:
            out.trace_id = caller_trace_id(metadata or {})
            return
        trace = self.trace
        ctx = self.propagate.extract(metadata) if metadata else None
        service = SERVICES.get(out.method, "vigil")
        wall_ns, mono = time.time_ns(), time.monotonic()
        kind = trace.SpanKind.SERVER if metadata is not None else trace.SpanKind.INTERNAL
        if out.protocol == "http":  # named as OpenTelemetry names HTTP server spans: method and route
            route = HTTP_ROUTES.get(out.method, out.method)
            name, attributes = f"POST {route}", {"http.request.method": "POST", "http.route": route}
        else:
            name, attributes = f"{service}/{out.method}", {"rpc.system": "grpc", "rpc.service": service,
                                                            "rpc.method": out.method}
        span = self.tracer.start_span(name, context=ctx, kind=kind, start_time=wall_ns,
                                      attributes={**attributes, "vigil.request_id": out.request_id})
        out.span = RequestSpan(span, mono, wall_ns)
        out.trace_id = trace.format_trace_id(span.get_span_context().trace_id)

    def span_id(self, out) -> str:
        if out.span is None:
            return ""
        return self.trace.format_span_id(out.span.span.get_span_context().span_id)

    def publishing(self, out, topic: str):
        """Start the publish span of the request's event; returns the callback that ends
        it (Publisher.publish's on_done), or None when the request is not traced."""
        if out.span is None or not out.span.span.is_recording():
            return None
        trace = self.trace
        span = self.tracer.start_span(
            f"publish {topic}", context=trace.set_span_in_context(out.span.span), kind=trace.SpanKind.PRODUCER,
            attributes={"messaging.system": "kafka", "messaging.operation.type": "send",
                        "messaging.destination.name": topic})

        def done(outcome: str) -> None:
            if outcome:
                span.set_attribute("vigil.outcome", outcome)
                if outcome != "outbox":  # lost
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"event lost: {outcome}"))
            span.end()
        return done

    def end(self, out) -> None:
        """The stage spans from the engine's timestamps, the request's attributes, and its end."""
        rs = out.span
        if rs is None:
            return
        span = rs.span
        if span.is_recording():
            self.stages(out, rs)
            f = out.finished
            attributes = {
                "vigil.model": out.model, "vigil.version": out.version, "vigil.route": out.route,
                "vigil.status": out.status,
                "gen_ai.request.model": out.model, "gen_ai.usage.input_tokens": out.prompt_tokens,
            }
            if out.protocol == "http":
                attributes["http.response.status_code"] = HTTP_STATUS.get(out.status, 500)
            else:
                attributes["rpc.grpc.status_code"] = GRPC_CODES.get(out.status, 2)
            if f is not None:
                attributes["gen_ai.usage.output_tokens"] = f.completion_tokens
                attributes["gen_ai.response.finish_reasons"] = (f.finish_reason,)
            if out.tenant:
                attributes["vigil.tenant"] = out.tenant
            if out.shadow_of:
                attributes["vigil.shadow_of"] = out.shadow_of
            if out.flags:
                attributes["vigil.flags"] = tuple(out.flags)
            span.set_attributes(attributes)
            if out.status in SERVER_ERRORS:
                span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, out.error[:200] or out.status))
        span.end()

    def stages(self, out, rs: RequestSpan) -> None:
        if not out.submitted:  # never reached the engine
            return
        t = out.timing
        if not (t.queue_s or t.total_s):  # answered without timestamps (the engine stopping)
            return
        ctx = self.trace.set_span_in_context(rs.span)
        arrival = out.submitted
        admitted = arrival + t.queue_s

        def child(name: str, start: float, end: float, **attributes) -> None:
            s = self.tracer.start_span(name, context=ctx, start_time=rs.ns(start), attributes=attributes or None)
            s.end(end_time=rs.ns(max(start, end)))

        child("queue", arrival, admitted)
        if out.scores is not None:
            child("score", admitted, arrival + t.total_s, **{"vigil.labels": len(out.scores)})
            return
        if t.first_token_s <= t.queue_s:  # ended (cancelled, failed) before its first token
            return
        f = out.finished
        child("prefill", admitted, arrival + t.first_token_s, **{"vigil.prompt_tokens": out.prompt_tokens})
        if f is not None and f.completion_tokens > 1:
            child("decode", arrival + t.first_token_s, arrival + t.total_s,
                  **{"vigil.tokens": f.completion_tokens - 1})

"""The server's edge: a grpc.aio interceptor that checks each call's API key, its right
to the method, and its key's limits, before the call reaches a service.

- Health (grpc.health.v1), reflection, and the Open Inference Protocol's ServerLive and
  ServerReady are open: load balancers and probes call them without a key.
- No `authorization` metadata, a malformed one or an unknown or expired key:
  UNAUTHENTICATED (with `www-authenticate: Bearer` in the trailing metadata).
- A key without `admin: true` calling an admin method: PERMISSION_DENIED.
- Over a limit: RESOURCE_EXHAUSTED at once, `retry-after-ms` in the trailing metadata.

Calls refused here give no inference event (a flood of refused calls must not become a
flood of events); they are counted per key in the metrics below. The secret is never
logged: only the key's name and tenant are.
"""

from __future__ import annotations

import logging

import grpc
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily

from eventbus.apikeys import AuthError, AuthOptions, KeyStore
from inference.edge.auth import authorize, is_open
from inference.edge.ratelimit import CALLER, REFUSAL, Caller, Limiter, Refused

log = logging.getLogger(__name__)

CODES = {"unauthenticated": grpc.StatusCode.UNAUTHENTICATED, "permission_denied": grpc.StatusCode.PERMISSION_DENIED}


class EdgeMetrics:
    """Per-key counters; labels are the key's name and tenant, never the secret."""

    def __init__(self, registry, limiter: Limiter):
        self.calls = Counter("vigil_key_requests", "Requests let in, per API key (a request stream's "
                             "messages each count)", ("key", "tenant"), registry=registry)
        self.limited = Counter("vigil_key_rate_limited", "Requests refused with RESOURCE_EXHAUSTED by a key's "
                               "limit (requests_per_second, tokens_per_minute, max_streams)",
                               ("key", "tenant", "limit"), registry=registry)
        self.token_count = Counter("vigil_key_tokens", "Prompt and completion tokens paid by each API key",
                                   ("key", "tenant"), registry=registry)
        self.denied = Counter("vigil_key_permission_denied", "Admin calls refused to keys without the admin "
                              "right", ("key", "tenant", "method"), registry=registry)
        self.failures = Counter("vigil_auth_failures", "Calls refused with UNAUTHENTICATED, by reason "
                                "(missing, malformed, unknown, expired)", ("reason",), registry=registry)
        self.reloads = Counter("vigil_auth_key_file_reloads", "Key file reloads, by result (ok, error)",
                               ("result",), registry=registry)
        registry.register(_StreamsCollector(limiter))

    def admitted(self, key) -> None:
        self.calls.labels(key.name, key.tenant).inc()

    def refused(self, key, limit: str) -> None:
        self.limited.labels(key.name, key.tenant, limit).inc()

    def tokens(self, key, n: int) -> None:
        self.token_count.labels(key.name, key.tenant).inc(n)


class _StreamsCollector:
    def __init__(self, limiter: Limiter):
        self.limiter = limiter

    def collect(self):
        g = GaugeMetricFamily("vigil_key_streams", "Calls in flight per API key", labels=("key", "tenant"))
        for s in list(self.limiter.states.values()):
            g.add_metric([s.key.name, s.key.tenant], s.streams)
        yield g


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, options: AuthOptions, registry):
        self.limiter = Limiter()
        self.metrics = EdgeMetrics(registry, self.limiter)
        self.store = KeyStore(options, on_reload=self._reloaded)  # raises KeyFileError on a bad file

    def _reloaded(self, keys, result: str) -> None:
        self.metrics.reloads.labels(result).inc()
        if keys is not None:
            self.limiter.update(keys.values())

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or is_open(method):
            return handler
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method, handler.request_streaming))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method, True))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, method, False))
        return handler._replace(stream_stream=self._streaming(handler.stream_stream, method, True))

    # -- the checks --------------------------------------------------------------------

    def admit(self, metadata, method: str, request_streaming: bool = False) -> Caller:
        """Authenticate, authorize and admit a call of any front (gRPC here, the HTTP front
        too): metadata is the call's (name, value) pairs, names in lower case. Raises
        AuthError or Refused, counted in the metrics; the Caller returned holds one of its
        key's streams until `release`."""
        self.store.maybe_reload()
        try:
            key = self.store.authenticate(metadata)
            authorize(key, method)
        except AuthError as e:
            if e.code == "permission_denied":
                self.metrics.denied.labels(key.name, key.tenant, method.rsplit("/", 1)[-1]).inc()
            else:
                self.metrics.failures.labels(e.reason).inc()
            raise
        caller = Caller(key, self.limiter.state(key), self.limiter, self.metrics)
        try:
            caller.state.check_stream()
            if not request_streaming:  # a request stream pays per message instead
                caller.admit()
        except Refused as r:
            if r.limit == "max_streams":
                self.metrics.refused(key, r.limit)
            raise
        caller.state.open_stream()
        caller.streams_open = True
        return caller

    async def gate(self, context, method: str, request_streaming: bool) -> Caller:
        """Authenticate, authorize and admit a call, or abort it."""
        try:
            caller = self.admit(context.invocation_metadata(), method, request_streaming)
        except AuthError as e:
            if e.code == "permission_denied":
                await context.abort(CODES[e.code], str(e))
            await context.abort(CODES[e.code], str(e), trailing_metadata=(("www-authenticate", 'Bearer realm="vigil"'),))
        except Refused as r:
            await self.refuse(context, r)
        context.add_done_callback(lambda _ctx: self.release(caller))
        CALLER.set(caller)
        return caller

    @staticmethod
    def release(caller: Caller) -> None:
        if caller.streams_open:
            caller.streams_open = False
            caller.state.close_stream()

    @staticmethod
    async def refuse(context, r: Refused):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(r),
                            trailing_metadata=(("retry-after-ms", str(r.retry_after_ms)),))

    # -- wrapping the handlers ---------------------------------------------------------

    def _unary(self, behavior, method: str, request_streaming: bool):
        async def unary(request, context):
            caller = await self.gate(context, method, request_streaming)
            if request_streaming:
                request = self.paced(request, caller)
            return await behavior(request, context)
        return unary

    def _streaming(self, behavior, method: str, request_streaming: bool):
        async def streaming(request, context):
            caller = await self.gate(context, method, request_streaming)
            if request_streaming:
                request = self.paced(request, caller)
            async for response in behavior(request, context):
                yield response
        return streaming

    @staticmethod
    async def paced(requests, caller: Caller):
        """The messages of a request stream, each let in by its key's limits. A refused
        message still goes on, with REFUSAL set in the context of whoever reads it, so
        that the service answers it in-band (RESOURCE_EXHAUSTED for that request only)
        and the stream goes on."""
        async for request in requests:
            try:
                caller.admit()
                REFUSAL.set(None)
            except Refused as r:
                REFUSAL.set(r)
            yield request

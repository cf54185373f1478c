"""The inference server: one grpc.aio port with the Open Inference Protocol, the native
vigil.v1 LLM service, gRPC health and reflection; Prometheus metrics on a second port;
OpenAI's HTTP API on a third, where asked (inference.api.http_front)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from eventbus import codec
from eventbus.metrics import PublisherMetrics
from eventbus.ports import cannot_listen, serve_metrics
from eventbus.publisher import Publisher, PublisherOptions
from eventbus.supervise import Supervisor
from eventbus.topics import TopicOptions
from inference.api.events import EventSink, MemorySink, to_message
from inference.api.http_front import HttpFront
from inference.api.kserve import KServeService
from inference.api.llm_service import LLMService
from inference.api.rollout_follower import RolloutFollower
from inference.api.router import Router
from inference.api.serving import Serving
from inference.api.options import ServerOptions
from inference.api.versions import VersionManager
from inference.edge.interceptor import EdgeInterceptor
from inference.edge.metrics import ServerMetrics
from inference.edge.parse_errors import DecodeErrors
from inference.edge.tls import server_credentials
from inference.edge.tracing import Tracing
from inference.runtime.compute import ComputeThread
from inference.runtime.demo import DEMO_MODEL_NAME, cache_dir
from protos import grpc_service_pb2_grpc, llm_pb2_grpc
from protos.reflection import SERVICE_NAMES, reflection_pool

log = logging.getLogger(__name__)


class InferenceServer:
    def __init__(self, options: ServerOptions, sink: EventSink | None = None, tracer_provider=None):
        """tracer_provider: an OpenTelemetry TracerProvider to record spans with (tests,
        benchmarks); otherwise one exporting by OTLP is made at start when
        options.tracing names an endpoint."""
        self.options = options
        options.tracing.check()
        self.tracing = Tracing(tracer_provider)
        self.router = Router()
        self.metrics = ServerMetrics(self.router)
        self.tasks = Supervisor(self.metrics.registry, on_change=self._tasks_changed)  # background tasks
        self.publisher: Publisher | None = None
        if sink is None and options.events.bootstrap_servers:
            self.publisher = Publisher(publisher_options(options), PublisherMetrics(self.metrics.registry),
                                       to_message=to_message, tasks=self.tasks)
            sink = self.publisher
        self.sink = sink if sink is not None else MemorySink()
        self.serving = Serving(self.router, self.sink, self.metrics, options.limits,
                               include_text=options.events.include_text, token_key=options.events.token_key,
                               tracing=self.tracing,
                               log_text=options.log_include_text)
        itl = self.metrics.itl
        self.versions = VersionManager(self.router, options.engine,
                                       on_token=lambda m, v: itl.labels(m, v).observe)
        self.health = health.aio.HealthServicer()
        self.grpc: grpc.aio.Server | None = None
        self.edge: EdgeInterceptor | None = None  # API keys and limits, with a key file
        self.metrics_http = None
        self.http: HttpFront | None = None  # OpenAI's HTTP API, where options.http_port >= 0
        self.http_port = 0
        self.follower: RolloutFollower | None = None  # follows vigil.rollout when events go to Kafka
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        o = self.options
        if o.threads:
            ComputeThread.shared().set_threads(o.threads)
        # key file and TLS files are checked before the model loads: a bad one stops start-up at once
        credentials = server_credentials(o.tls) if o.tls.enabled else None
        self.edge = EdgeInterceptor(o.auth, self.metrics.registry) if o.auth.keys_file else None
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 << 20), ("grpc.so_reuseport", 0)],
                                 interceptors=[*([self.edge] if self.edge else []), DecodeErrors()])
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeService(self.serving, self.versions), server)
        llm_pb2_grpc.add_LLMServicer_to_server(LLMService(self.serving, self.versions), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(
            names, server, pool=reflection_pool(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR))
        self.grpc = server
        try:
            await self._start(server, credentials)
        except BaseException:
            await self._close_listeners()
            raise

    async def _start(self, server: grpc.aio.Server, credentials) -> None:
        """Every port is taken before the model loads, so a busy one stops start-up at once."""
        o = self.options
        address = f"{o.host}:{o.port}"
        try:
            self.port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # grpc says only "Failed to bind"
            self.port = 0
        if not self.port:
            raise cannot_listen("gRPC", o.host, o.port)
        if o.metrics_port >= 0:
            self.metrics_http = serve_metrics(self.metrics.registry, o.host, o.metrics_port)
            self.metrics_port = self.metrics_http.server_port
        if o.http_port >= 0:  # bound now, served with the gRPC port once the model is loaded
            self.http = HttpFront(self.serving, self.edge)
            self.http_port = self.http.bind(o.http_host or o.host, o.http_port)
        if o.model:
            await self.versions.load(model_name(o), o.version, o.model, o.quantize, o.group_size)
        self.serving.source = f"vigil-inference/{socket.gethostname()}:{self.port}"
        if not self.tracing.enabled and o.tracing.otlp_endpoint:
            self.tracing = self.serving.tracing = Tracing.from_options(
                o.tracing, instance=f"{socket.gethostname()}:{self.port}")
        if self.publisher is not None:
            if not self.publisher.options.outbox_dir:
                self.publisher.options = dataclasses.replace(
                    self.publisher.options, outbox_dir=str(cache_dir() / "outbox" / f"{o.host}-{self.port}"))
            await self.publisher.start()
        if o.events.bootstrap_servers:  # the latest rollout state is applied before serving
            self.follower = RolloutFollower(self.router, o.events.bootstrap_servers, security=o.events.security,
                                            tasks=self.tasks)
            await self.follower.start()
        await server.start()
        if self.http is not None:
            await self.http.serve(o.tls)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _tasks_changed(self, tasks: Supervisor) -> None:
        """gRPC health says NOT_SERVING while a background task waits to be restarted."""
        status = health_pb2.HealthCheckResponse.SERVING if tasks.ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            asyncio.ensure_future(self.health.set(name, status))

    async def _close_listeners(self) -> None:
        await self.grpc.stop(None)
        self.grpc = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.metrics_http:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()
            self.metrics_http = None

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.grpc:
            await self.grpc.stop(grace)
        if self.http is not None:
            await self.http.stop()
        if self.metrics_http:
            self.metrics_http.shutdown()
        if self.follower is not None:
            await self.follower.stop()
        await asyncio.to_thread(self.versions.stop)
        if self.publisher is not None:
            await self.publisher.stop()
        await asyncio.to_thread(self.tracing.shutdown)  # export the last spans


def publisher_options(o: ServerOptions) -> PublisherOptions:
    e = o.events
    return PublisherOptions(
        bootstrap_servers=e.bootstrap_servers, outbox_dir=e.outbox_dir, content_type=codec.FORMATS[e.format],
        source="vigil-inference", client_id="vigil-inference", queue_size=e.queue_size, security=e.security,
        publish_timeout_ms=e.publish_timeout_ms, compression=None if e.compression == "none" else e.compression,
        outbox_fsync_ms=e.outbox_fsync_ms, outbox_max_bytes=e.outbox_max_bytes,
        topic_options=TopicOptions(partitions=e.topic_partitions, replication_factor=e.topic_replication_factor,
                                   retention_ms=e.topic_retention_ms))


def model_name(o: ServerOptions) -> str:
    if o.model_name:
        return o.model_name
    if o.model == "demo":
        return DEMO_MODEL_NAME
    return Path(o.model).name.removesuffix(".gguf").lower()

"""What a server is started with: its model, engine, limits, events, traces, keys and
TLS. Plain settings, so the `vigil` command builds its options from their defaults
without importing the server and torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from eventbus.apikeys import AuthOptions
from eventbus.security import KafkaSecurity
from inference.api.limits import Limits
from inference.edge.tls import TlsOptions
from inference.edge.tracing import TracingOptions


@dataclass(frozen=True)
class EngineOptions:
    kv_slots: int = 16
    max_seq_len: int = 1024
    max_waiting: int = 64


@dataclass
class EventOptions:
    bootstrap_servers: str = ""  # empty: events stay in process (MemorySink)
    format: str = "protobuf"     # or "json"
    include_text: bool = False   # prompt and completion text in events, not only hash and length
    token_key: bytes = b""       # key of the completion token hashes in events (events.TokenHasher)
    outbox_dir: str = ""         # empty: <cache>/outbox/<host>-<port>
    outbox_fsync_ms: int = 1000
    outbox_max_bytes: int = 1 << 30
    queue_size: int = 10_000
    publish_timeout_ms: int = 5_000
    compression: str = "gzip"    # gzip or none (lz4, zstd, snappy need cramjam)
    topic_partitions: int = 6
    topic_replication_factor: int = 1
    topic_retention_ms: int = 7 * 24 * 3600 * 1000
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS of every Kafka client


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int = 8002  # 0: any free port; negative: no metrics endpoint
    http_port: int = -1       # OpenAI-compatible HTTP API; 0: any free port; negative: off
    http_host: str = ""        # the HTTP API's address; empty: host
    model: str = "demo"
    model_name: str = ""       # default: the demo's name, or the file/folder name
    version: str = "1"
    quantize: str = "int4"
    group_size: int = 32
    engine: EngineOptions = field(default_factory=EngineOptions)
    limits: Limits = field(default_factory=Limits)
    threads: int = 0  # torch intra-op threads; 0: torch's default
    events: EventOptions = field(default_factory=EventOptions)
    tracing: TracingOptions = field(default_factory=TracingOptions)  # OpenTelemetry spans; off without an endpoint
    log_include_text: bool = False  # prompt and completion text in the per-request log line
    auth: AuthOptions = field(default_factory=AuthOptions)  # API keys and their limits; off without a key file
    tls: TlsOptions = field(default_factory=TlsOptions)     # TLS and mutual TLS on the gRPC port; off without files

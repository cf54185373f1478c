"""`vigil serve` and `vigil fetch-demo`: their options, and the server they start.
vigil/cli.py registers them with ``add_parser(subparsers, option)`` and
``add_fetch_demo_parser(subparsers)`` and calls ``run(args)``; `vigil up` takes the
server's options with ``add_server_options`` and ``server_options`` and runs it with
``run_server``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from eventbus import security as kafka_security
from eventbus.apikeys import AuthOptions
from eventbus.ports import port, port_or_minus_one
from inference.api.limits import Limits
from inference.api.options import EngineOptions, EventOptions, ServerOptions
from inference.edge.tls import TlsOptions
from inference.edge.tracing import TracingOptions
from inference.runtime.demo import demo_model_path
from inference.runtime.precision import INT4_GROUP_SIZES, QUANTIZE_MODES


def add_parser(subparsers, option) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="run the inference server",
                                  description="Run the gRPC inference server with one model version loaded.")
    add_server_options(serve, option)
    return serve


def add_fetch_demo_parser(subparsers) -> argparse.ArgumentParser:
    return subparsers.add_parser(
        "fetch-demo", help="download the demo model into the cache folder",
        description="Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into $VIGIL_CACHE_DIR or ~/.cache/vigil.")


def run(args) -> int:
    if args.command == "fetch-demo":
        print(demo_model_path())
        return 0
    try:
        asyncio.run(run_server(server_options(args), "vigil serve"))
    except (OSError, ValueError, LookupError) as exc:
        print(f"vigil serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def add_server_options(p: argparse.ArgumentParser, option, http_port: int | None = None) -> None:
    """http_port: the default of --http-port (`vigil up` serves HTTP by default, `vigil serve` does not)."""
    d = ServerOptions()
    g = p.add_argument_group("network")
    option(g, "--host", default=d.host, help="address to listen on, gRPC and metrics")
    option(g, "--port", type=port, default=d.port, help="gRPC port (Open Inference Protocol and vigil.v1)")
    option(g, "--metrics-port", type=port_or_minus_one, default=d.metrics_port,
                   help="Prometheus metrics port; 0 picks a free port, -1 turns metrics off")
    option(g, "--http-port", type=port_or_minus_one, default=d.http_port if http_port is None else http_port,
           help="OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, with SSE "
                "streaming; the same keys, limits and events as gRPC); 0 picks a free port, -1 turns it off")
    option(g, "--http-host", default=d.http_host, help="address of the HTTP API; empty: --host")
    g = p.add_argument_group("model")
    option(g, "--model", default=d.model,
                   help="a GGUF file, a Hugging Face folder (config.json, *.safetensors, tokenizer.json), or 'demo'")
    option(g, "--model-name", default=d.model_name,
                   help="name the model is served under; default: smollm2-135m-instruct for the demo, "
                        "else the file or folder name")
    option(g, "--model-version", default=d.version, help="version label of the model loaded at start")
    option(g, "--quantize", choices=QUANTIZE_MODES, default=d.quantize,
                   help="weight-only precision: none (fp32), int8 per channel, int4 group-wise "
                        "(Q4_0/Q4_1 GGUF weights are taken over exactly)")
    option(g, "--group-size", type=int, choices=INT4_GROUP_SIZES, default=d.group_size,
                   help="int4 group size")
    g = p.add_argument_group("scheduling")
    e = EngineOptions()
    option(g, "--kv-slots", type=positive, default=e.kv_slots,
                   help="KV cache slots per model version: the most sequences decoded together")
    option(g, "--max-seq-len", type=positive, default=e.max_seq_len,
                   help="tokens per KV slot: prompt plus completion")
    option(g, "--max-waiting", type=positive, default=e.max_waiting,
                   help="requests that may wait for a slot; beyond it calls get RESOURCE_EXHAUSTED")
    lim = Limits()
    option(g, "--max-tokens-limit", type=positive, default=lim.max_tokens,
                   help="largest max_tokens a request may ask for")
    option(g, "--default-max-tokens", type=positive, default=lim.default_max_tokens,
                   help="max_tokens of a request that does not set it")
    option(g, "--max-prompt-chars", type=positive, default=lim.max_prompt_chars,
                   help="longest prompt accepted, in characters")
    option(g, "--threads", type=int, default=d.threads, help="torch CPU threads; 0 keeps torch's default")
    add_event_options(p, option)
    add_security_options(p, option)
    add_observability_options(p, option)


def add_event_options(p: argparse.ArgumentParser, option) -> None:
    e = EventOptions()
    g = p.add_argument_group("events", "one event per request and per Feedback call, on Kafka")
    option(g, "--bootstrap-servers", default=e.bootstrap_servers,
           help="Kafka brokers, HOST:PORT[,HOST:PORT...]; empty: events stay in process"
                " (`vigil up` starts an embedded broker instead)")
    option(g, "--event-format", choices=("protobuf", "json"), default=e.format,
           help="record values: protobuf (protos/events.proto) or its JSON mapping")
    option(g, "--events-include-text", action="store_true",
           help="put prompt and completion text in events (otherwise only their SHA-256 and length)")
    option(g, "--events-token-key-file", default="",
           help="file with the key of the completion token hashes in events (the same on every server; "
                "without one the hashes can be read back with the tokenizer)")
    option(g, "--outbox-dir", default=e.outbox_dir,
           help="the events' write-ahead log: each is written there before its request is answered, "
                "and waits there until the broker acknowledges it; empty: <cache>/outbox/<host>-<port>")
    option(g, "--outbox-fsync-ms", type=int, default=e.outbox_fsync_ms,
           help="fsync the outbox at most this long after a write (what a power loss may take); "
                "0 before each request is answered, -1 never")
    option(g, "--outbox-max-bytes", type=positive, default=e.outbox_max_bytes,
           help="outbox size limit; events beyond it are sent from memory only while the broker keeps up, "
                "else lost and counted")
    option(g, "--event-queue-size", type=positive, default=e.queue_size,
           help="events kept in memory for sending while the broker keeps up; beyond, sent from the outbox")
    option(g, "--publish-timeout-ms", type=positive, default=e.publish_timeout_ms,
           help="events not acknowledged within this are sent from the outbox once the broker answers")
    option(g, "--event-compression", choices=("gzip", "none", "lz4", "zstd", "snappy"), default=e.compression,
           help="compression of record batches (lz4, zstd and snappy need the cramjam package)")
    option(g, "--topic-partitions", type=positive, default=e.topic_partitions,
           help="partitions of each topic created at start-up (existing topics are left alone)")
    option(g, "--topic-replication-factor", type=positive, default=e.topic_replication_factor,
           help="replication factor of topics created at start-up")
    option(g, "--topic-retention-ms", type=int, default=e.topic_retention_ms,
           help="retention of topics created at start-up (vigil.rollout is compacted instead); -1 forever")
    kafka_security.add_options(p, option)


def add_observability_options(p: argparse.ArgumentParser, option) -> None:
    t = TracingOptions()
    g = p.add_argument_group("traces and request logs", "a span per request (queue, prefill, decode, publish) "
                             "and one log line per request; the log format and levels are global options "
                             "(vigil --log-format json ...)")
    option(g, "--otlp-endpoint", default=t.otlp_endpoint,
           help="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (https:// for TLS); "
                "empty: no spans are recorded (a caller's traceparent still gives the events their trace id)")
    option(g, "--otel-service-name", default=t.service_name, help="service.name of the spans")
    option(g, "--trace-sample-ratio", type=float, default=t.sample_ratio,
           help="share of new traces recorded; a caller's traceparent decides for its own trace")
    option(g, "--log-include-text", action="store_true",
           help="put prompt and completion text in the per-request log line (otherwise never)")


def add_security_options(p: argparse.ArgumentParser, option) -> None:
    a, t = AuthOptions(), TlsOptions()
    g = p.add_argument_group("security", "API keys with per-key limits, and TLS on the gRPC port; "
                                         "both off by default (README: Security)")
    option(g, "--auth-keys", default=a.keys_file,
           help="key file (YAML or JSON) of hashed API keys, each with a tenant, an admin right and limits; "
                "calls then need 'authorization: Bearer <key>' (health and reflection stay open); "
                "empty: no key is checked")
    option(g, "--auth-reload-s", type=float, default=a.reload_s,
           help="seconds between checks of the key file for changes (a bad file keeps the keys in force); 0: never")
    option(g, "--tls-cert", default=t.cert_file, help="PEM certificate chain of the server; turns TLS on")
    option(g, "--tls-key", default=t.key_file, help="PEM private key of --tls-cert (not encrypted)")
    option(g, "--tls-client-ca", default=t.client_ca_file,
           help="PEM CA certificates that sign client certificates: turns on mutual TLS, every client "
                "must then present a certificate signed by one of them")


def auth_options(args) -> AuthOptions:
    return AuthOptions(keys_file=args.auth_keys, reload_s=args.auth_reload_s)


def tls_options(args) -> TlsOptions:
    return TlsOptions(cert_file=args.tls_cert, key_file=args.tls_key, client_ca_file=args.tls_client_ca)


def _read_key(path: str) -> bytes:
    if not path:
        return b""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise SystemExit(f"--events-token-key-file: cannot read {path}: {e.strerror or e}")
    if not 1 <= len(key) <= 64:
        raise SystemExit(f"--events-token-key-file: {path} must hold 1 to 64 bytes (has {len(key)})")
    return key


def event_options(args) -> EventOptions:
    return EventOptions(
        bootstrap_servers=args.bootstrap_servers, format=args.event_format,
        include_text=args.events_include_text, token_key=_read_key(args.events_token_key_file),
        outbox_dir=args.outbox_dir,
        outbox_fsync_ms=args.outbox_fsync_ms, outbox_max_bytes=args.outbox_max_bytes,
        queue_size=args.event_queue_size, publish_timeout_ms=args.publish_timeout_ms,
        compression=args.event_compression, topic_partitions=args.topic_partitions,
        topic_replication_factor=args.topic_replication_factor, topic_retention_ms=args.topic_retention_ms,
        security=kafka_security.from_args(args))


def server_options(args) -> ServerOptions:
    return ServerOptions(
        host=args.host, port=args.port, metrics_port=args.metrics_port, http_port=args.http_port,
        http_host=args.http_host, model=args.model,
        model_name=args.model_name, version=args.model_version, quantize=args.quantize,
        group_size=args.group_size, threads=args.threads,
        engine=EngineOptions(kv_slots=args.kv_slots, max_seq_len=args.max_seq_len, max_waiting=args.max_waiting),
        limits=Limits(max_tokens=args.max_tokens_limit, default_max_tokens=min(args.default_max_tokens,
                                                                                args.max_tokens_limit),
                      max_prompt_chars=args.max_prompt_chars),
        events=event_options(args), auth=auth_options(args), tls=tls_options(args),
        tracing=TracingOptions(otlp_endpoint=args.otlp_endpoint, service_name=args.otel_service_name,
                               sample_ratio=args.trace_sample_ratio),
        log_include_text=args.log_include_text)


async def run_server(options: ServerOptions, banner: str, started=None) -> None:
    from inference.api.server import InferenceServer  # torch: only where a server runs

    server = InferenceServer(options)
    await server.start()
    stop = stop_on_signals()  # before the lines that say it runs: a SIGTERM after them stops it cleanly
    o = server.options
    metrics = f"on http://{o.host}:{server.metrics_port}/metrics" if server.metrics_http else "off"
    print(f"{banner}: gRPC on {o.host}:{server.port} (Open Inference Protocol + vigil.v1), metrics {metrics}",
          flush=True)
    if server.http is not None:
        scheme = "https" if o.tls.enabled else "http"
        print(f"  HTTP on {scheme}://{o.http_host or o.host}:{server.http_port}/v1 (OpenAI-compatible: "
              "chat/completions, completions, models)", flush=True)
    for mv in server.router.all():
        print(f"  model {mv.model} version {mv.version} ({mv.quantize}) from {mv.source}", flush=True)
    if server.publisher is not None:
        p = server.publisher.options
        print(f"  events to Kafka at {p.bootstrap_servers} ({o.events.format}), outbox {p.outbox_dir}", flush=True)
    else:
        print("  events: kept in process (no --bootstrap-servers)", flush=True)
    if server.edge is not None:
        print(f"  API keys: {len(server.edge.store.keys)} from {o.auth.keys_file} (health and reflection open)",
              flush=True)
    if o.tls.enabled:
        print("  TLS on" + (", mutual: client certificates from --tls-client-ca required"
                            if o.tls.client_ca_file else ""), flush=True)
    if started is not None:
        started()
    await stop.wait()
    print("shutting down", flush=True)
    await server.stop()


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop

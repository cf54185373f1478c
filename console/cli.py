"""`vigil ui`: options and entry. vigil/cli.py registers it with
``add_parser(subparsers, option)`` and calls ``run(args)``."""

from __future__ import annotations

import asyncio
import signal
import sys

from eventbus import security as kafka_security
from eventbus.ports import PortError, port

from .service import Console, Options


def add_parser(subparsers, option):
    d = Options()
    p = subparsers.add_parser(
        "ui", help="serve a live page of the loop, read from the topics",
        description="Serve a page that shows, live, what the topics say: models, versions, traffic weights and "
                    "the rollout's decisions (vigil.rollout), request figures per version "
                    "(vigil.inference.events), drift and calibration (vigil.signals), alerts (vigil.alerts). "
                    "It reads the topics without a consumer group, so any number of pages may run.")
    g = p.add_argument_group("page")
    option(g, "--host", env="VIGIL_UI_HOST", default=d.host, help="address to listen on")
    option(g, "--port", env="VIGIL_UI_PORT", type=port, default=d.port, help="port; 0 picks a free port")
    g = p.add_argument_group("kafka")
    option(g, "--bootstrap-servers", default=d.bootstrap_servers, help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--backlog", env="VIGIL_UI_BACKLOG", type=int, default=d.backlog,
           help="records per partition of vigil.signals and vigil.inference.events read from before the start "
                "(vigil.rollout and vigil.alerts are read whole)")
    kafka_security.add_options(p, option)
    return p


def run(args) -> int:
    async def main(options: Options) -> None:
        console = Console(options)
        await console.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"vigil ui: {console.url} (topics from {options.bootstrap_servers})", flush=True)
        try:
            await stop.wait()
        finally:
            await console.stop()

    try:
        options = Options(bootstrap_servers=args.bootstrap_servers, host=args.host, port=args.port,
                          backlog=args.backlog, security=kafka_security.from_args(args))
        asyncio.run(main(options))
    except (PortError, ValueError) as e:  # ValueError: Kafka security settings, naming the option
        print(f"vigil ui: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0

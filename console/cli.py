"""`vigil ui` and `vigil report`: options and entry. vigil/cli.py registers both with
``add_parser(subparsers, option)`` and calls ``run(args)`` for either."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

from eventbus import security as kafka_security
from eventbus.ports import PortError, port

from .report import ReportError, parse_time, report
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
    g = p.add_argument_group("the other services", "their HTTP APIs")
    option(g, "--rollout-url", env="VIGIL_UI_ROLLOUT_URL", default=d.rollout_url,
           help="the rollout controller's admin API (http://HOST:8004): the page's pause, resume, promote, roll "
                "back and undo go there; empty: no actions")
    option(g, "--alerting-url", env="VIGIL_UI_ALERTING_URL", default=d.alerting_url,
           help="alerting's (or an Alertmanager's) API (http://HOST:9095): which alerts are silenced")
    option(g, "--auth-keys", env="VIGIL_UI_AUTH_KEYS", default=d.auth_keys,
           help="key file (as `vigil serve --auth-keys`): actions then need a key with admin: true, sent as "
                "'Authorization: Bearer <key>' and passed on to the controller")
    g = p.add_argument_group("kafka")
    option(g, "--bootstrap-servers", default=d.bootstrap_servers, help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--backlog", env="VIGIL_UI_BACKLOG", type=int, default=d.backlog,
           help="records per partition of vigil.signals and vigil.inference.events read from before the start "
                "(vigil.rollout and vigil.alerts are read whole)")
    kafka_security.add_options(p, option)
    add_report_parser(subparsers, option)
    return p


def add_report_parser(subparsers, option):
    p = subparsers.add_parser(
        "report", help="write a model's charts over a time range as one HTML file and PNG figures",
        description="Read vigil.rollout, vigil.alerts, vigil.signals and vigil.inference.events from their "
                    "beginning and write, for one model and a time range (by event time), a self-contained HTML "
                    "file (plotly.js inlined: it opens without a network) with the page's charts and tables: "
                    "requests, errors and latency per version, drift against thresholds with the detections, "
                    "candidate against stable, calibration, the alerts' changes and the rollout's decisions with "
                    "their reasons; and a PNG per chart.")
    g = p.add_argument_group("report")
    option(g, "--model", env="VIGIL_REPORT_MODEL", required=True, help="the model to report on")
    option(g, "--since", env="VIGIL_REPORT_SINCE", default="1h",
           help="start of the range: ISO 8601 (UTC unless a zone is given) or a duration before now (30m, 2h, 1d)")
    option(g, "--until", env="VIGIL_REPORT_UNTIL", default="now", help="end of the range, as --since; `now` by default")
    option(g, "--out", env="VIGIL_REPORT_OUT", default="", help="the HTML file; default vigil-report-MODEL-YYYYmmddTHHMMSS.html here")
    option(g, "--png-dir", env="VIGIL_REPORT_PNG_DIR", default="", help="folder of the PNG figures; default: beside --out, named after it")
    p.add_argument("--no-png", action="store_true", help="write the HTML file only (PNGs need Chromium)")
    g = p.add_argument_group("kafka")
    option(g, "--bootstrap-servers", default=Options().bootstrap_servers, help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    kafka_security.add_options(p, option)
    return p


def run(args) -> int:
    if args.command == "report":
        return run_report(args)
    async def main(options: Options) -> None:
        console = Console(options)
        await console.start()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"vigil ui: {console.url} (topics from {options.bootstrap_servers}"
              + (f"; actions to {options.rollout_url}" + (" with an admin key" if options.auth_keys else "")
                 if options.rollout_url else "; no actions: no --rollout-url")
              + (f"; silences from {options.alerting_url}" if options.alerting_url else "") + ")", flush=True)
        try:
            await stop.wait()
        finally:
            await console.stop()

    try:
        options = Options(bootstrap_servers=args.bootstrap_servers, host=args.host, port=args.port,
                          backlog=args.backlog, security=kafka_security.from_args(args),
                          rollout_url=args.rollout_url, alerting_url=args.alerting_url, auth_keys=args.auth_keys)
        asyncio.run(main(options))
    except (PortError, ValueError) as e:  # ValueError: Kafka security settings, the key file, naming it
        print(f"vigil ui: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run_report(args) -> int:
    try:
        now = time.time()
        since, until = parse_time("--since", args.since, now), parse_time("--until", args.until, now)
        out = Path(args.out or f"vigil-report-{args.model}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.html")
        png_dir = None if args.no_png else Path(args.png_dir) if args.png_dir else out.with_name(out.stem + "-png")
        written = asyncio.run(report(args.bootstrap_servers, args.model, since, until, out, png_dir,
                                     kafka_security.from_args(args)))
    except (ReportError, ValueError) as e:  # ValueError: Kafka security settings, naming the option
        print(f"vigil report: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    c = written.collected
    print(f"vigil report: {written.html} ({c.kept} records of {args.model}, {len(written.pngs)} PNG figures"
          + (f" in {png_dir}" if written.pngs else "") + ")", flush=True)
    return 0

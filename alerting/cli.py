"""Command-line entry points, each `main(argv) -> exit code`, for vigil/cli.py to wire:

    vigil alerting check-rules FILE... [--detector NAME] [--feature NAME]   -> check_rules_main
    vigil alerting check-config FILE                                         -> check_config_main
    vigil alerting silences create -m 'model="m"' [-m ...] --author A --comment C [--duration 2h | --ends-at T]
    vigil alerting silences list [--expired] [--json]
    vigil alerting silences expire ID...                                     -> silences_main
    vigil alerting [--bootstrap-servers ... --rules FILE... --config FILE ...] -> run (the service)

`add_parser(subparsers, option)` registers all of them under `vigil alerting` and `run(args)`
runs what was asked (vigil/cli.py calls both).

The silences commands talk to a running `vigil alerting` through its admin API
(Alertmanager's v2 silences API): --url, or VIGIL_ALERTING_URL, default
http://127.0.0.1:9095. They work against a real Alertmanager too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

from eventbus.ports import PortError, check_free, port

from .config import load_config
from eventbus.durations import parse_duration
from eventbus.yamlpos import FileErrors

from .durations import parse_rfc3339, rfc3339
from .labels import parse_matcher
from .rules import check_files
from .vocabulary import DEFAULT

DEFAULT_URL = "http://127.0.0.1:9095"


CHECK_RULES = "Validate Vigil alerting rule files, as promtool check rules does."
CHECK_CONFIG = "Validate the alerting configuration (routes, receivers, inhibitions)."
SILENCES = "Create, list and expire silences."


def _check_rules_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--detector", action="append", default=[], help="accept this detector name too")
    p.add_argument("--feature", action="append", default=[], help="accept this feature name too")


def check_rules_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vigil alerting check-rules", description=CHECK_RULES)
    _check_rules_args(p)
    return _check_rules(p.parse_args(argv))


def _check_rules(a) -> int:
    vocab = DEFAULT.extended(a.detector, a.feature)
    failed = False
    for f in a.files:
        print(f"Checking {f}")
        rules, errors = check_files([f], vocab)
        if errors:
            failed = True
            print(f"  FAILED: {len(errors)} error{'s' * (len(errors) != 1)}", file=sys.stderr)
            for e in errors:
                print(f"{e}", file=sys.stderr)
        else:
            print(f"  SUCCESS: {len(rules)} rules found")
    return 1 if failed else 0


def check_config_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vigil alerting check-config", description=CHECK_CONFIG)
    p.add_argument("files", nargs="+", metavar="FILE")
    return _check_config(p.parse_args(argv))


def _check_config(a) -> int:
    failed = False
    for f in a.files:
        print(f"Checking {f}")
        try:
            cfg = load_config(f)
        except FileErrors as e:
            failed = True
            print(f"  FAILED: {len(e.errors)} errors", file=sys.stderr)
            for err in e.errors:
                print(str(err), file=sys.stderr)
            continue
        nroutes = sum(1 for _ in cfg.route.walk())
        print(f"  SUCCESS: {len(cfg.receivers)} receivers, {nroutes} routes, {len(cfg.inhibit_rules)} inhibit rules")
    return 1 if failed else 0


def _request(url: str, method: str = "GET", body=None, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def _api_matcher(m: dict) -> str:
    op = ("=" if m.get("isEqual", True) else "!") + ("~" if m.get("isRegex") else "")
    if op == "!":
        op = "!="
    return f"{m['name']}{op}{json.dumps(m['value'])}"


def silences_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vigil alerting silences", description=SILENCES)
    _silences_args(p)
    return _silences(p.parse_args(argv))


def _silences_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("VIGIL_ALERTING_URL", DEFAULT_URL),
                   help="admin API of vigil alerting (or an Alertmanager); env VIGIL_ALERTING_URL")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="silence the alerts these matchers select")
    c.add_argument("-m", "--matcher", action="append", required=True,
                   help='a label matcher: name="value", name!="v", name=~"re", name!~"re" (repeat for more)')
    c.add_argument("--author", default=os.environ.get("USER", ""), help="who silences (default: $USER)")
    c.add_argument("--comment", required=True, help="why")
    c.add_argument("--duration", default="1h", help="how long, from --starts-at (default 1h)")
    c.add_argument("--starts-at", help="RFC 3339 start (default now)")
    c.add_argument("--ends-at", help="RFC 3339 end (instead of --duration)")
    ls = sub.add_parser("list", help="list silences (active and pending; --expired for all)")
    ls.add_argument("--expired", action="store_true")
    ls.add_argument("--json", action="store_true")
    ex = sub.add_parser("expire", help="expire silences by id")
    ex.add_argument("ids", nargs="+")


def _silences(a) -> int:
    base = a.url.rstrip("/")
    try:
        if a.cmd == "create":
            try:
                matchers = [parse_matcher(m) for m in a.matcher]
                starts = parse_rfc3339(a.starts_at) if a.starts_at else time.time()
                ends = parse_rfc3339(a.ends_at) if a.ends_at else starts + parse_duration(a.duration)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            body = {"matchers": [{"name": m.name, "value": m.value, "isRegex": m.op in ("=~", "!~"),
                                  "isEqual": m.op in ("=", "=~")} for m in matchers],
                    "startsAt": rfc3339(starts), "endsAt": rfc3339(ends), "createdBy": a.author,
                    "comment": a.comment}
            out = _request(f"{base}/api/v2/silences", "POST", body)
            print(out["silenceID"])
        elif a.cmd == "list":
            items = _request(f"{base}/api/v2/silences")
            if not a.expired:
                items = [s for s in items if s["status"]["state"] != "expired"]
            if a.json:
                print(json.dumps(items, indent=2))
            else:
                print(f"{'ID':36}  {'STATE':8}  {'ENDS AT':24}  {'CREATED BY':12}  MATCHERS  COMMENT")
                for s in items:
                    ms = " ".join(_api_matcher(m) for m in s["matchers"])
                    print(f"{s['id']:36}  {s['status']['state']:8}  {s['endsAt'][:24]:24}  {s['createdBy'][:12]:12}  "
                          f"{ms}  {s['comment']}")
        else:
            for id in a.ids:
                _request(f"{base}/api/v2/silence/{id}", "DELETE")
                print(f"expired {id}")
    except urllib.error.HTTPError as e:
        print(f"error: {e.code} {e.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"error: cannot reach {base}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`vigil alerting SUBCOMMAND ...` dispatch, for a lead who prefers one entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"check-rules": check_rules_main, "check-config": check_config_main, "silences": silences_main}
    if not argv or argv[0] not in cmds:
        print(f"usage: vigil alerting {{{','.join(cmds)}}} ...", file=sys.stderr)
        return 2
    return cmds[argv[0]](argv[1:])


# -- `vigil alerting`, wired into vigil/cli.py ------------------------------------------------

PACKAGE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RULES = os.path.join(PACKAGE, "default_rules.yml")
DEFAULT_CONFIG = os.path.join(PACKAGE, "default_config.yml")


def add_parser(subparsers, option) -> argparse.ArgumentParser:
    """`vigil alerting` (the service) and its subcommands. `option` is vigil.cli's helper
    that also reads each option from VIGIL_<NAME>."""
    p = subparsers.add_parser(
        "alerting", help="run the alerting service, check rules and configuration, manage silences",
        description="Without a subcommand: run the alerting service (signals from vigil.signals, alert "
                    "state changes to vigil.alerts, notifications to webhooks and Alertmanagers; state kept "
                    "on the compacted vigil.alerting.state topic). SIGHUP reloads rules and configuration, "
                    "keeping the last good ones when the new ones are invalid.")
    g = p.add_argument_group("service")
    option(g, "--bootstrap-servers", default="127.0.0.1:9092", help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--rules", nargs="+", default=[DEFAULT_RULES], metavar="FILE",
           help="rule files (in VIGIL_RULES: separated by commas)")
    option(g, "--config", default=DEFAULT_CONFIG, metavar="FILE",
           help="routes, receivers (webhooks, Alertmanagers), inhibition rules")
    option(g, "--admin-host", default="127.0.0.1", help="address of the admin API and /metrics")
    option(g, "--admin-port", type=port, default=9095,
           help="port of the admin API (Alertmanager v2 silences and alerts, /-/reload) and /metrics; 0: any free")
    option(g, "--peer-position", type=int, default=0,
           help="position in an HA group: 0 sends at once; N waits N x --peer-timeout, then sends only what "
                "the shared notification log does not show as sent")
    option(g, "--peer-timeout", type=float, default=15.0, help="seconds a standby waits per position")
    option(g, "--instance", default="",
           help="name of this instance's snapshot on vigil.alerting.state; default alerting-<peer position> "
                "(keep it across restarts)")
    option(g, "--webhook-secret-file", default="",
           help="HMAC-SHA256 secret for webhooks whose configuration has no hmac_secret")
    option(g, "--snapshot-interval", type=float, default=5.0,
           help="seconds between state snapshots (also written soon after every change)")
    option(g, "--topic-partitions", type=int, default=6, help="partitions of topics created at start-up")
    from eventbus import security as kafka_security

    kafka_security.add_options(p, option)
    sub = p.add_subparsers(dest="alerting_command", required=False, metavar="SUBCOMMAND")
    _check_rules_args(sub.add_parser("check-rules", help="validate rule files", description=CHECK_RULES))
    sub.add_parser("check-config", help="validate the configuration", description=CHECK_CONFIG).add_argument(
        "files", nargs="+", metavar="FILE")
    _silences_args(sub.add_parser("silences", help="create, list and expire silences", description=SILENCES))
    return p


def _files(value) -> list[str]:
    if isinstance(value, str):  # from the environment
        return [f.strip() for f in value.split(",") if f.strip()]
    out = []
    for v in value:
        out.extend(_files(v) if "," in v else [v])
    return out


def run(args) -> int:
    """Run what `vigil alerting ...` asked for; returns the exit code."""
    cmd = getattr(args, "alerting_command", None)
    if cmd == "check-rules":
        return _check_rules(args)
    if cmd == "check-config":
        return _check_config(args)
    if cmd == "silences":
        return _silences(args)
    import asyncio

    from eventbus import security as kafka_security

    from .service import ServiceOptions, serve

    try:
        security = kafka_security.from_args(args)
        check_free("--admin-port", args.admin_host, args.admin_port)  # before any Kafka client is made
    except ValueError as e:  # names the --kafka-* option at fault
        print(f"vigil alerting: {e}", file=sys.stderr)
        return 2
    except PortError as e:
        print(f"vigil alerting: {e}", file=sys.stderr)
        return 2
    options = ServiceOptions(
        bootstrap_servers=args.bootstrap_servers, rule_files=_files(args.rules), config_file=args.config,
        admin_host=args.admin_host, admin_port=args.admin_port, instance=args.instance,
        peer_position=args.peer_position, peer_timeout=args.peer_timeout,
        webhook_secret_file=args.webhook_secret_file, snapshot_interval=args.snapshot_interval,
        topic_partitions=args.topic_partitions, security=security)
    try:
        asyncio.run(serve(options))
    except FileErrors as e:
        print(f"vigil alerting: refusing to start on invalid rules or configuration:\n{e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, LookupError) as e:
        print(f"vigil alerting: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vigil rollout` commands, each through `main(argv, api) -> exit code`:

    vigil rollout start MODEL --candidate V [--strategy canary|bluegreen|shadow] [--steps 5,10,25,50,100]
                        [--min-requests N] [--interval S] [--inconclusive-limit N] [--failure-limit N]
                        [--keep-old-for S] [--watch S]
    vigil rollout status [MODEL] [--json]
    vigil rollout pause|resume|promote|abort|undo MODEL
    vigil rollout history MODEL [--json]       (decisions, then the response policy's actions)
    vigil rollout check-policy FILE...         (no controller needed)
    vigil rollout register MODEL VERSION... [--stable V]
    vigil rollout set-flag MODEL NAME --percentage P [--rule ATTRIBUTE:OP[:VALUE]]... [--disabled]
    vigil rollout remove-flag MODEL NAME

They speak to the controller through one call, `api.call(op, **arguments) -> dict | list`,
which raises RolloutError for a bad request. `LocalApi` (api.py) runs a Controller in this process;
`FileApi` (the default here) keeps its state in a JSON file between commands
(--state, or VIGIL_ROLLOUT_STATE). A remote client (gRPC or Kafka request/reply to the
`vigil rollout` service) only has to provide the same `call`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from eventbus.flags import NUMERIC_OPS
from eventbus.ports import check_free, port

from .api import LocalApi
from .controller import Controller
from eventbus.yamlpos import FileErrors

from .policy import load_policy
from .records import STRATEGIES, RolloutError

DEFAULT_STATE = "~/.vigil/rollout.json"


class FileApi(LocalApi):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        snap = json.loads(self.path.read_text()) if self.path.exists() else {}
        super().__init__(Controller.restore(snap))

    def call(self, op: str, **kw):
        r = super().call(op, **kw)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.controller.snapshot()))
        tmp.replace(self.path)
        return r


class HttpApi:
    """The admin API of a running `vigil rollout` service: POST <url>/api/<op>."""

    def __init__(self, url: str, timeout: float = 10.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, op: str, **kw):
        import urllib.error
        import urllib.request

        req = urllib.request.Request(f"{self.url}/api/{op}", data=json.dumps(kw).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read())
            except ValueError:
                body = {"error": f"HTTP {e.code}", "field": ""}
            if body.get("field"):
                raise RolloutError(body["field"], body["error"].removeprefix(f"{body['field']}: ")) from None
            raise RolloutError("url", f"{self.url}: {body.get('error')}") from None
        except OSError as e:
            raise RolloutError("url", f"cannot reach the rollout service at {self.url}: {e}") from None


def parse_steps(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise RolloutError("steps", f"{part.strip()!r} is not a number") from None
    return out


def parse_rule(text: str) -> dict:
    """ATTRIBUTE:OP[:VALUE]; `in` and `not_in` take a comma-separated list, the comparisons
    a number, `exists` nothing."""
    attribute, _, rest = text.partition(":")
    op, _, value = rest.partition(":")
    if not attribute or not op:
        raise RolloutError("rule", f"{text!r} is not ATTRIBUTE:OP[:VALUE]")
    if op in ("in", "not_in"):
        return {"attribute": attribute, "op": op, "value": value.split(",")}
    if op in NUMERIC_OPS:
        try:
            return {"attribute": attribute, "op": op, "value": float(value)}
        except ValueError:
            raise RolloutError("rule", f"{text!r}: {op} needs a number") from None
    return {"attribute": attribute, "op": op, "value": None if op == "exists" else value}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vigil rollout", description="Move traffic between model versions.")
    p.add_argument("--state", default=os.environ.get("VIGIL_ROLLOUT_STATE", DEFAULT_STATE),
                   help="controller state file for the in-process controller [env VIGIL_ROLLOUT_STATE] "
                        "(default: %(default)s)")
    add_commands(p.add_subparsers(dest="command", required=True))
    return p


def add_commands(sub) -> None:
    s = sub.add_parser("start", help="start a rollout of a candidate version")
    s.add_argument("model")
    s.add_argument("--candidate", required=True, metavar="VERSION")
    s.add_argument("--strategy", choices=STRATEGIES)
    s.add_argument("--steps", help="canary steps in percent, e.g. 5,10,25,50,100")
    s.add_argument("--min-requests", type=int, help="candidate requests an analysis needs")
    s.add_argument("--interval", type=float, help="seconds between analyses")
    s.add_argument("--inconclusive-limit", type=int, help="inconclusive analyses in a row before pausing")
    s.add_argument("--failure-limit", type=int, help="failed analyses tolerated before rolling back")
    s.add_argument("--keep-old-for", type=float, help="blue/green: seconds the old version stays loaded")
    s.add_argument("--watch", type=float, help="seconds after the promotion that the old version stays loaded "
                                               "as the last healthy one, for the response policy's fallback")
    s.add_argument("--stable", help="the stable version, when the controller has seen no event of the model yet")
    st = sub.add_parser("status", help="phase, weights and last reason")
    st.add_argument("model", nargs="?")
    st.add_argument("--json", action="store_true")
    cp = sub.add_parser("check-policy", help="validate response policy files (every error names its line)")
    cp.add_argument("files", nargs="+", metavar="FILE")
    h = sub.add_parser("history", help="promotions, rollbacks and the response policy's actions, with reasons")
    h.add_argument("model")
    h.add_argument("--json", action="store_true")
    for name, text in (("pause", "hold the current step"), ("resume", "continue a paused rollout"),
                       ("promote", "make the candidate stable now"), ("abort", "send all traffic back to stable"),
                       ("undo", "go back one stable version")):
        sub.add_parser(name, help=text).add_argument("model")
    r = sub.add_parser("register", help="make versions known to the in-process controller")
    r.add_argument("model")
    r.add_argument("versions", nargs="+", metavar="VERSION")
    r.add_argument("--stable", default="")
    f = sub.add_parser("set-flag", help="add or change a feature flag, evaluated by the servers per request")
    f.add_argument("model")
    f.add_argument("name")
    f.add_argument("--percentage", type=float, required=True, help="share of routing keys in the flag's arm")
    f.add_argument("--rule", action="append", default=[], metavar="ATTRIBUTE:OP[:VALUE]",
                   help="a condition on a request attribute (op: eq, ne, in, not_in, prefix, matches, exists, "
                        "gt, gte, lt, lte); every rule must match")
    f.add_argument("--disabled", action="store_true", help="keep the flag but put nobody in its arm")
    rf = sub.add_parser("remove-flag", help="remove a feature flag")
    rf.add_argument("model")
    rf.add_argument("name")


def _pct(w: float) -> str:
    return f"{w * 100:g}%"


def show_status(d: dict) -> str:
    lines = [f"{d['model']}: {d['phase']}" + (" (needs attention)" if d.get("attention") else ""),
             f"  stable {d['stable']}" + (f", candidate {d['candidate']} ({d['strategy']} step {d['step']})"
                                          if d["candidate"] else ""),
             "  weights " + ", ".join(f"{v} {_pct(w)}" for v, w in d["weights"].items())
             + (f"; shadow {', '.join(d['shadow'])}" if d["shadow"] else "")]
    if d.get("keep_loaded"):
        lines.append(f"  kept loaded as the last healthy version: {', '.join(d['keep_loaded'])}")
    if d.get("temperatures"):
        lines.append("  temperatures " + ", ".join(f"{v} {t:.4g}" for v, t in sorted(d["temperatures"].items())))
    for name, f in sorted(d.get("flags", {}).items()):
        rules = " and ".join(f"{r['attribute']} {r['op']} {r['value']}" for r in f["rules"])
        lines.append(f"  flag {name} {f['percentage']:g}%" + (f" where {rules}" if rules else "")
                     + ("" if f["enabled"] else " (disabled)"))
    if d.get("window"):
        w = d["window"]
        lines.append(f"  this step {d['candidate']} served {w['requests']} requests compared with stable; "
                     f"comparisons {', '.join(w['comparisons']) or 'none yet'}")
    lines.append(f"  reason {d['reason']}")
    return "\n".join(lines)


def _when(t: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(t))}Z"


def show_history(rows: list[dict], actions: list[dict] | None = None) -> str:
    lines = [f"{_when(r['time'])} {r['action']:<11} {r['from']} -> {r['to']}  {r['reason']}" for r in rows] \
        or ["no promotions or rollbacks yet"]
    if actions:
        lines.append("actions by the response policy:")
        lines += [f"{_when(a['time'])} {a['action']:<11} {a['outcome']:<8} {a['version']}"
                  + (f" -> {a['target_version']}" if a.get("target_version") else "")
                  + f"  [{a['policy']}] {a['reason']}" for a in actions]
    return "\n".join(lines)


def check_policy(files: list[str]) -> int:
    """Like `vigil alerting check-rules`: every error as FILE:LINE: FIELD: MESSAGE on stderr."""
    bad = False
    for f in files:
        try:
            p = load_policy(f)
        except FileErrors as e:
            bad = True
            for err in e.errors:
                print(err, file=sys.stderr)
            continue
        print(f"{f}: {len(p)} rules OK")
        for r in p.rules:
            print(f"  {r.describe()}")
    return 1 if bad else 0


def main(argv: list[str] | None = None, api=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return execute(a, api or FileApi(a.state))
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def execute(a, api, command: str | None = None) -> int:
    command = command or a.command
    if command == "check-policy":
        return check_policy(a.files)
    try:
        if command == "start":
            kw = {"min_requests": a.min_requests, "interval": a.interval, "inconclusive_limit": a.inconclusive_limit,
                  "failure_limit": a.failure_limit, "keep_old_for": a.keep_old_for, "watch": a.watch,
                  "stable": getattr(a, "stable", None)}
            d = api.call("start", model=a.model, candidate=a.candidate, strategy=a.strategy,
                         steps=parse_steps(a.steps) if a.steps else None, **{k: v for k, v in kw.items() if v is not None})
            print(show_status(d))
        elif command == "status":
            models = [a.model] if a.model else api.call("list_models")
            found = [api.call("status", model=m) for m in models]
            print(json.dumps(found if not a.model else found[0], indent=2) if a.json
                  else "\n".join(show_status(d) for d in found) or "no models")
        elif command == "history":
            rows = api.call("history", model=a.model)
            acts = api.call("actions", model=a.model)
            print(json.dumps({"decisions": rows, "actions": acts}, indent=2) if a.json else show_history(rows, acts))
        elif command == "set-flag":
            flag = {"name": a.name, "percentage": a.percentage, "enabled": not a.disabled,
                    "rules": [parse_rule(r) for r in a.rule]}
            print(show_status(api.call("set_flag", model=a.model, flag=flag)))
        elif command == "remove-flag":
            print(show_status(api.call("remove_flag", model=a.model, name=a.name)))
        elif command == "register":
            d = api.call("register", model=a.model, versions=a.versions, stable=a.stable or None)
            print(show_status(api.call("status", model=a.model)) if d is None else show_status(d))
        else:
            print(show_status(api.call(command, model=a.model)))
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


DEFAULT_URL = "http://127.0.0.1:8004"


def add_parser(subparsers, option, cache_dir: str | os.PathLike = "") -> argparse.ArgumentParser:
    """`vigil rollout` (the controller service) and its commands, on the `vigil` parser.
    `option` is vigil.cli.option (flags with VIGIL_* environment defaults); `cache_dir` is
    vigil's cache folder, where the default outbox goes (~/.vigil when not given)."""
    from .config import RolloutConfig

    p = subparsers.add_parser(
        "rollout", help="run the rollout controller, or talk to it",
        description="Without a command: run the rollout controller (consumes vigil.signals and vigil.alerts: "
                    "the processors' comparisons of candidate and stable, drift, alerts; publishes decisions "
                    "on vigil.rollout; one "
                    "leader among instances of the same --group-id). With a command: ask the running "
                    "controller through its admin API (--url).")
    g = p.add_argument_group("controller service")
    option(g, "--bootstrap-servers", default="127.0.0.1:9092", help="Kafka brokers, HOST:PORT[,HOST:PORT...]")
    option(g, "--host", env="VIGIL_ROLLOUT_HOST", default="127.0.0.1", help="address of the admin API")
    option(g, "--admin-port", type=port, default=8004, help="admin API and /metrics port; 0 picks a free port")
    option(g, "--group-id", env="VIGIL_ROLLOUT_GROUP_ID", default="vigil-rollout",
           help="consumer group of the leader lease; instances in one group elect one leader")
    option(g, "--tick", env="VIGIL_ROLLOUT_TICK", type=float, default=1.0, help="seconds between analyses checks")
    option(g, "--session-timeout-ms", env="VIGIL_ROLLOUT_SESSION_TIMEOUT_MS", type=int, default=6000,
           help="a leader that stops answering is replaced after this long")
    option(g, "--outbox-dir", env="VIGIL_ROLLOUT_OUTBOX_DIR", default="",
           help="where decisions wait while the broker is unreachable; empty: <cache>/outbox/rollout-<instance>")
    p.set_defaults(rollout_cache_dir=str(cache_dir))
    d = RolloutConfig()
    option(g, "--default-min-requests", type=int, default=d.min_requests,
           help="candidate requests an analysis needs, for rollouts started without --min-requests")
    option(g, "--default-interval", type=float, default=d.interval,
           help="seconds between analyses, for rollouts started without --interval")
    option(g, "--default-watch", type=float, default=d.watch,
           help="seconds after a promotion that the old version stays loaded as the last healthy one, for "
                "rollouts started without --watch")
    from .policy import DEFAULT_POLICY

    option(g, "--policy", env="VIGIL_ROLLOUT_POLICY", default=str(DEFAULT_POLICY),
           help="response policy (YAML): which alerts on a version in production lead to a fallback, retrain, "
                "recalibrate or notify-only action; reloaded on SIGHUP (a bad file keeps the last good one); "
                "empty: none (default: the shipped conservative policy, %(default)s)")
    option(g, "--policy-dry-run", env="VIGIL_ROLLOUT_POLICY_DRY_RUN", action="store_true",
           help="record the actions the policy would take (outcome dry-run on vigil.actions), take none")
    from eventbus import security as kafka_security

    kafka_security.add_options(p, option)
    option(p.add_argument_group("commands"), "--url", env="VIGIL_ROLLOUT_URL", default=DEFAULT_URL,
           help="admin API of the running controller")
    sub = p.add_subparsers(dest="rollout_command", required=False, metavar="COMMAND")
    add_commands(sub)
    for c in sub.choices.values():  # `vigil rollout status --url ...` as well as `vigil rollout --url ... status`
        c.add_argument("--url", default=argparse.SUPPRESS, help="admin API of the running controller")
    return p


def run(args) -> int:
    if args.rollout_command:
        return execute(args, HttpApi(args.url), args.rollout_command)
    import asyncio
    import signal

    from eventbus import security as kafka_security

    from .config import RolloutConfig
    from .service import ServiceOptions, run as run_service

    async def until_signalled():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    try:
        defaults = RolloutConfig(min_requests=args.default_min_requests, interval=args.default_interval,
                                 watch=args.default_watch)
        if args.policy:
            load_policy(args.policy)  # a bad policy file stops the start, every error named
        options = ServiceOptions(bootstrap_servers=args.bootstrap_servers, host=args.host,
                                 admin_port=args.admin_port, group_id=args.group_id, tick=args.tick,
                                 session_timeout_ms=args.session_timeout_ms, outbox_dir=args.outbox_dir,
                                 cache_dir=getattr(args, "rollout_cache_dir", ""),
                                 defaults=defaults, security=kafka_security.from_args(args),
                                 policy=args.policy, policy_dry_run=args.policy_dry_run)
        check_free("--admin-port", args.host, args.admin_port)  # before any Kafka client is made
        asyncio.run(run_service(options, until_signalled))
    except RolloutError as e:
        print(f"vigil rollout: {e}", file=sys.stderr)
        return 2
    except FileErrors as e:
        print(f"vigil rollout: --policy {args.policy}:", file=sys.stderr)
        for err in e.errors:
            print(err, file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # ValueError: Kafka security settings, naming the option
        print(f"vigil rollout: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

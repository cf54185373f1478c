"""`vigil rollout` commands, each through `main(argv, api) -> exit code`:

    vigil rollout start MODEL --candidate V [--strategy canary|bluegreen|shadow] [--steps 5,10,25,50,100]
                        [--min-requests N] [--interval S] [--inconclusive-limit N] [--failure-limit N]
                        [--keep-old-for S]
    vigil rollout status [MODEL] [--json]
    vigil rollout pause|resume|promote|abort|undo MODEL
    vigil rollout history MODEL [--json]
    vigil rollout register MODEL VERSION... [--stable V]

They speak to the controller through one call, `api.call(op, **arguments) -> dict | list`,
which raises RolloutError for a bad request. `LocalApi` runs a Controller in this process;
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

from .controller import Controller
from .records import STRATEGIES, Decision, RolloutError

OPS = ("register", "start", "status", "list_models", "pause", "resume", "promote", "abort", "undo",
       "history", "set_flag", "remove_flag")
DEFAULT_STATE = "~/.vigil/rollout.json"


def _plain(r):
    if isinstance(r, Decision):
        r = r.to_dict()
        r.pop("state")
    return r


class LocalApi:
    def __init__(self, controller: Controller | None = None):
        self.controller = controller or Controller()

    def call(self, op: str, **kw):
        if op not in OPS:
            raise RolloutError("op", f"{op!r} is not one of {', '.join(OPS)}")
        if op == "register":  # versions travel as a list
            return _plain(self.controller.register(kw["model"], *kw.get("versions", ()), stable=kw.get("stable", "")))
        return _plain(getattr(self.controller, op)(**kw))


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


def parse_steps(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise RolloutError("steps", f"{part.strip()!r} is not a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vigil rollout", description="Move traffic between model versions.")
    p.add_argument("--state", default=os.environ.get("VIGIL_ROLLOUT_STATE", DEFAULT_STATE),
                   help="controller state file for the in-process controller [env VIGIL_ROLLOUT_STATE] "
                        "(default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
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
    st = sub.add_parser("status", help="phase, weights and last reason")
    st.add_argument("model", nargs="?")
    st.add_argument("--json", action="store_true")
    h = sub.add_parser("history", help="promotions and rollbacks with their reasons")
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
    return p


def _pct(w: float) -> str:
    return f"{w * 100:g}%"


def show_status(d: dict) -> str:
    lines = [f"{d['model']}: {d['phase']}" + (" (needs attention)" if d.get("attention") else ""),
             f"  stable {d['stable']}" + (f", candidate {d['candidate']} ({d['strategy']} step {d['step']})"
                                          if d["candidate"] else ""),
             "  weights " + ", ".join(f"{v} {_pct(w)}" for v, w in d["weights"].items())
             + (f"; shadow {', '.join(d['shadow'])}" if d["shadow"] else "")]
    if d.get("window"):
        lines.append("  this step " + ", ".join(f"{v} {w['requests']} requests {w['errors']} errors"
                                                for v, w in d["window"].items()))
    lines.append(f"  reason {d['reason']}")
    return "\n".join(lines)


def show_history(rows: list[dict]) -> str:
    if not rows:
        return "no promotions or rollbacks yet"
    return "\n".join(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(r['time']))}Z {r['action']:<11} "
                     f"{r['from']} -> {r['to']}  {r['reason']}" for r in rows)


def main(argv: list[str] | None = None, api=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        api = api or FileApi(a.state)
        if a.command == "start":
            kw = {"min_requests": a.min_requests, "interval": a.interval, "inconclusive_limit": a.inconclusive_limit,
                  "failure_limit": a.failure_limit, "keep_old_for": a.keep_old_for}
            d = api.call("start", model=a.model, candidate=a.candidate, strategy=a.strategy,
                         steps=parse_steps(a.steps) if a.steps else None, **{k: v for k, v in kw.items() if v is not None})
            print(show_status(d))
        elif a.command == "status":
            models = [a.model] if a.model else api.call("list_models")
            found = [api.call("status", model=m) for m in models]
            print(json.dumps(found if not a.model else found[0], indent=2) if a.json
                  else "\n".join(show_status(d) for d in found) or "no models")
        elif a.command == "history":
            rows = api.call("history", model=a.model)
            print(json.dumps(rows, indent=2) if a.json else show_history(rows))
        elif a.command == "register":
            d = api.call("register", model=a.model, versions=a.versions, stable=a.stable)
            print(show_status(api.call("status", model=a.model)) if d is None else show_status(d))
        else:
            print(show_status(api.call(a.command, model=a.model)))
    except RolloutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The notification configuration: Alertmanager's own shape (route tree, receivers with
webhook_configs, inhibit_rules), so a team can move a routing tree across unchanged, plus
what Vigil adds: a per-receiver `throttle`, HMAC signing and retry settings on webhooks,
and `alertmanagers:` (real Alertmanagers fed through their v2 API).

    global:
      external_url: http://vigil-alerting:9095
    route:
      receiver: oncall
      group_by: [alertname, model]
      group_wait: 30s
      group_interval: 5m
      repeat_interval: 4h
      routes:
        - matchers: ['severity="critical"']
          receiver: pager
          continue: false
    receivers:
      - name: oncall
        throttle: {max_notifications: 20, interval: 1m}
        webhook_configs:
          - url: http://bridge:8080/hook
            send_resolved: true
            max_alerts: 50
            timeout: 10s
            hmac_secret_file: /run/secrets/hook   # or hmac_secret:
            max_attempts: 5
            backoff: 500ms
            max_backoff: 30s
      - name: pager
        webhook_configs:
          - url: http://pager:8080/hook
    inhibit_rules:
      - source_matchers: ['alertname="RollbackFiring"']
        target_matchers: ['severity="warning"']
        equal: [model]
    alertmanagers:
      - url: http://alertmanager:9093
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .labels import matchers_string
from .rules import _Checker
from .vocabulary import DEFAULT
from eventbus.matchers import LABEL_NAME, Matcher, parse_matcher
from eventbus.yamlpos import FileError, FileErrors, Map, Seq, YamlError, load


@dataclass
class WebhookConfig:
    url: str
    send_resolved: bool = True
    max_alerts: int = 0
    timeout: float = 10.0
    hmac_secret: bytes | None = None
    max_attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Throttle:
    max_notifications: int
    interval: float


@dataclass
class Receiver:
    name: str
    webhooks: list[WebhookConfig] = field(default_factory=list)
    throttle: Throttle | None = None
    max_concurrency: int = 4
    queue_size: int = 10000


@dataclass
class Route:
    receiver: str
    matchers: list[Matcher]
    group_by: tuple[str, ...]
    group_by_all: bool
    group_wait: float
    group_interval: float
    repeat_interval: float
    continue_: bool = False
    routes: list["Route"] = field(default_factory=list)
    key: str = "{}"
    id: str = "{}"

    def match(self, labels) -> list["Route"]:
        for m in self.matchers:
            if not m.matches(labels):
                return []
        out: list[Route] = []
        for child in self.routes:
            got = child.match(labels)
            if got:
                out.extend(got)
                if not child.continue_:
                    break
        return out or [self]

    def walk(self):
        yield self
        for c in self.routes:
            yield from c.walk()


@dataclass
class InhibitRule:
    source: list[Matcher]
    target: list[Matcher]
    equal: tuple[str, ...]


@dataclass
class AlertmanagerTarget:
    url: str
    timeout: float = 10.0
    resend_interval: float = 60.0
    max_attempts: int = 3
    backoff: float = 0.5


@dataclass
class Config:
    route: Route
    receivers: dict[str, Receiver]
    inhibit_rules: list[InhibitRule] = field(default_factory=list)
    alertmanagers: list[AlertmanagerTarget] = field(default_factory=list)
    external_url: str = ""
    external_labels: dict[str, str] = field(default_factory=dict)


ROUTE_KEYS = {k: "" for k in ("receiver", "matchers", "group_by", "group_wait", "group_interval", "repeat_interval",
                              "continue", "routes")}
ROUTE_HINTS = {"match": "use `matchers: ['name=\"value\"']`", "match_re": "use `matchers: ['name=~\"re\"']`"}
WEBHOOK_KEYS = {k: "" for k in ("url", "url_file", "send_resolved", "max_alerts", "timeout", "hmac_secret",
                                "hmac_secret_file", "max_attempts", "backoff", "max_backoff", "headers")}


def _matchers(ck: _Checker, m: Map, key: str, path: str) -> list[Matcher]:
    raw = m.get(key)
    if raw is None:
        return []
    if not isinstance(raw, Seq):
        ck.err(m.line_of(key), f"{path}.{key}", "matchers are a list of strings such as 'severity=\"critical\"'")
        return []
    out = []
    for i, s in enumerate(raw):
        if not isinstance(s, str):
            ck.err(raw.line_of(i), f"{path}.{key}[{i}]", "a matcher is a string")
            continue
        try:
            out.append(parse_matcher(s))
        except ValueError as e:
            ck.err(raw.line_of(i), f"{path}.{key}[{i}]", str(e))
    return out


def _route(ck: _Checker, m, path: str, parent: Route | None, line: int) -> Route | None:
    if not isinstance(m, Map):
        ck.err(line, path, "a route is a mapping")
        return None
    ck.keys(m, ROUTE_KEYS, path, ROUTE_HINTS)
    recv = m.get("receiver", parent.receiver if parent else None)
    if not isinstance(recv, str) or not recv:
        ck.err(m.line_of("receiver"), f"{path}.receiver", "the root route needs a receiver")
        recv = ""
    gb_all, gb = (parent.group_by_all, parent.group_by) if parent else (False, ())
    if "group_by" in m:
        raw = m["group_by"]
        if not isinstance(raw, Seq) or not all(isinstance(x, str) for x in raw):
            ck.err(m.line_of("group_by"), f"{path}.group_by", "group_by is a list of label names")
        elif "..." in raw:
            if len(raw) > 1:
                ck.err(m.line_of("group_by"), f"{path}.group_by", "'...' groups by all labels and stands alone")
            gb_all, gb = True, ()
        else:
            for x in raw:
                if not LABEL_NAME.match(x):
                    ck.err(m.line_of("group_by"), f"{path}.group_by", f"invalid label name {x!r}")
            gb_all, gb = False, tuple(dict.fromkeys(raw))
    d = parent or Route("", [], (), False, 30.0, 300.0, 4 * 3600.0)
    gw = ck.duration(m, "group_wait", path, d.group_wait)
    gi = ck.duration(m, "group_interval", path, d.group_interval)
    ri = ck.duration(m, "repeat_interval", path, d.repeat_interval)
    if "group_interval" in m and gi <= 0:
        ck.err(m.line_of("group_interval"), f"{path}.group_interval", "group_interval must be positive")
    if "repeat_interval" in m and ri <= 0:
        ck.err(m.line_of("repeat_interval"), f"{path}.repeat_interval", "repeat_interval must be positive")
    matchers = _matchers(ck, m, "matchers", path)
    cont = m.get("continue", False)
    if not isinstance(cont, bool):
        ck.err(m.line_of("continue"), f"{path}.continue", "continue is true or false")
        cont = False
    if parent is None and (matchers or "continue" in m):
        ck.err(m.line, path, "the root route takes no matchers and no continue")
    r = Route(recv, matchers, gb, gb_all, gw, gi, ri, bool(cont))
    r.key = (parent.key + "/" if parent else "") + matchers_string(matchers)
    children = m.get("routes")
    if children is not None:
        if not isinstance(children, Seq):
            ck.err(m.line_of("routes"), f"{path}.routes", "routes is a list")
        else:
            for i, c in enumerate(children):
                child = _route(ck, c, f"{path}.routes[{i}]", r, children.line_of(i))
                if child is not None:
                    child.id = f"{child.key}/{i}"
                    r.routes.append(child)
    return r


def url_problem(url) -> str:
    """What makes `url` no http(s) address a notification can be sent to; empty when nothing."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return f"needs an http(s) url, not {url!r}"
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"{url!r} holds a space or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is no number, or beyond 65535
        return f"{url!r}: {str(e).lower()}"
    if not parts.hostname:
        return f"{url!r} has no host"
    if port == 0:
        return f"{url!r}: port 0 cannot be connected to"
    return ""


def _read_secret(ck, w: Map, path: str, key: str, base: Path | None) -> bytes | None:
    if key == "hmac_secret":
        v = w[key]
        if not isinstance(v, str) or not v:
            ck.err(w.line_of(key), f"{path}.{key}", "hmac_secret is a non-empty string")
            return None
        return v.encode()
    p = Path(os.path.expandvars(str(w[key])))
    if base is not None and not p.is_absolute():
        p = base / p
    try:
        return p.read_bytes().strip()
    except OSError as e:
        ck.err(w.line_of(key), f"{path}.{key}", f"cannot read {p}: {e.strerror or e}")
        return None


def _webhook(ck: _Checker, w, path: str, line: int, base: Path | None) -> WebhookConfig | None:
    if not isinstance(w, Map):
        ck.err(line, path, "a webhook config is a mapping")
        return None
    ck.keys(w, WEBHOOK_KEYS, path)
    url = w.get("url")
    if "url_file" in w:
        try:
            url = Path(str(w["url_file"])).read_text().strip()
        except OSError as e:
            ck.err(w.line_of("url_file"), f"{path}.url_file", f"cannot read: {e.strerror or e}")
    problem = url_problem(url)
    if problem:
        key = "url_file" if "url_file" in w else "url"
        ck.err(w.line_of(key), f"{path}.{key}", problem)
        return None
    cfg = WebhookConfig(url=url)
    if "send_resolved" in w:
        if not isinstance(w["send_resolved"], bool):
            ck.err(w.line_of("send_resolved"), f"{path}.send_resolved", "send_resolved is true or false")
        else:
            cfg.send_resolved = w["send_resolved"]
    for k in ("max_alerts", "max_attempts"):
        if k in w:
            v = w[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "max_alerts" else 1):
                ck.err(w.line_of(k), f"{path}.{k}", f"{k} is a whole number{' >= 1' if k == 'max_attempts' else ''}")
            else:
                setattr(cfg, k, v)
    cfg.timeout = ck.duration(w, "timeout", path, cfg.timeout)
    cfg.backoff = ck.duration(w, "backoff", path, cfg.backoff)
    cfg.max_backoff = ck.duration(w, "max_backoff", path, cfg.max_backoff)
    if "hmac_secret" in w and "hmac_secret_file" in w:
        ck.err(w.line_of("hmac_secret"), f"{path}.hmac_secret", "give hmac_secret or hmac_secret_file, not both")
    for k in ("hmac_secret", "hmac_secret_file"):
        if k in w:
            cfg.hmac_secret = _read_secret(ck, w, path, k, base)
    if "headers" in w:
        h = w["headers"]
        if not isinstance(h, Map) or not all(isinstance(v, str) for v in h.values()):
            ck.err(w.line_of("headers"), f"{path}.headers", "headers is a mapping of strings")
        else:
            cfg.headers = dict(h)
    return cfg


def parse_config(text: str, file: str = "<config>", base: Path | None = None) -> tuple[Config | None, list[FileError]]:
    ck = _Checker(file, DEFAULT)
    try:
        doc = load(text)
    except YamlError as e:
        ck.err(e.line, "yaml", e.message)
        return None, ck.errors
    if not isinstance(doc, Map):
        ck.err(1, "(top)", "the configuration is a mapping with route and receivers")
        return None, ck.errors
    ck.keys(doc, {"global": "", "route": "", "receivers": "", "inhibit_rules": "", "alertmanagers": "",
                  "templates": "", "time_intervals": "", "mute_time_intervals": ""}, "")
    ext_url, ext_labels = "", {}
    g = doc.get("global")
    if g is not None:
        if not isinstance(g, Map):
            ck.err(doc.line_of("global"), "global", "global is a mapping")
        else:
            ck.keys(g, {"external_url": "", "external_labels": "", "resolve_timeout": ""}, "global")
            ext_url = str(g.get("external_url", "") or "")
            el = g.get("external_labels") or {}
            if not isinstance(el, dict):
                ck.err(g.line_of("external_labels"), "global.external_labels", "a mapping of label names to values")
            else:
                ext_labels = {str(k): str(v) for k, v in el.items()}
    for k in ("templates", "time_intervals", "mute_time_intervals"):
        if doc.get(k):
            ck.err(doc.line_of(k), k, f"{k} is an Alertmanager feature Vigil does not have")
    receivers: dict[str, Receiver] = {}
    rl = doc.get("receivers")
    if not isinstance(rl, Seq) or not rl:
        ck.err(doc.line_of("receivers"), "receivers", "at least one receiver is needed")
        rl = Seq()
    for i, r in enumerate(rl):
        path = f"receivers[{i}]"
        if not isinstance(r, Map):
            ck.err(rl.line_of(i), path, "a receiver is a mapping")
            continue
        ck.keys(r, {"name": "", "webhook_configs": "", "throttle": "", "max_concurrency": "", "queue_size": ""}, path)
        name = r.get("name")
        if not isinstance(name, str) or not name:
            ck.err(r.line_of("name"), f"{path}.name", "a receiver needs a name")
            continue
        if name in receivers:
            ck.err(r.line_of("name"), f"{path}.name", f"receiver {name!r} defined twice")
            continue
        rec = Receiver(name)
        whs = r.get("webhook_configs") or Seq()
        if not isinstance(whs, Seq):
            ck.err(r.line_of("webhook_configs"), f"{path}.webhook_configs", "webhook_configs is a list")
        else:
            for j, w in enumerate(whs):
                cfg = _webhook(ck, w, f"{path}.webhook_configs[{j}]", whs.line_of(j), base)
                if cfg:
                    rec.webhooks.append(cfg)
        if "throttle" in r:
            t = r["throttle"]
            tpath = f"{path}.throttle"
            if not isinstance(t, Map):
                ck.err(r.line_of("throttle"), tpath, "throttle is {max_notifications: N, interval: D}")
            else:
                ck.keys(t, {"max_notifications": "", "interval": ""}, tpath)
                n = t.get("max_notifications")
                if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                    ck.err(t.line_of("max_notifications"), f"{tpath}.max_notifications", "a whole number >= 1")
                else:
                    iv = ck.duration(t, "interval", tpath, 60.0)
                    rec.throttle = Throttle(n, iv)
        for k in ("max_concurrency", "queue_size"):
            if k in r:
                v = r[k]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    ck.err(r.line_of(k), f"{path}.{k}", "a whole number >= 1")
                else:
                    setattr(rec, k, v)
        receivers[name] = rec
    route = None
    if "route" not in doc:
        ck.err(doc.line, "route", "missing route")
    else:
        route = _route(ck, doc["route"], "route", None, doc.line_of("route"))
        if route is not None:
            stack = [(route, "route", doc["route"])]
            while stack:
                r, p, m = stack.pop()
                if r.receiver and r.receiver not in receivers:
                    ck.err(m.line_of("receiver") if isinstance(m, Map) else 0, f"{p}.receiver",
                           f"undefined receiver {r.receiver!r}")
                kids = m.get("routes") if isinstance(m, Map) else None
                for i, c in enumerate(r.routes):
                    stack.append((c, f"{p}.routes[{i}]", kids[i] if isinstance(kids, Seq) and i < len(kids) else None))
    inhibit: list[InhibitRule] = []
    il = doc.get("inhibit_rules") or Seq()
    if not isinstance(il, Seq):
        ck.err(doc.line_of("inhibit_rules"), "inhibit_rules", "inhibit_rules is a list")
        il = Seq()
    for i, r in enumerate(il):
        path = f"inhibit_rules[{i}]"
        if not isinstance(r, Map):
            ck.err(il.line_of(i), path, "an inhibit rule is a mapping")
            continue
        ck.keys(r, {"source_matchers": "", "target_matchers": "", "equal": ""}, path,
                {"source_match": "use source_matchers", "target_match": "use target_matchers"})
        src = _matchers(ck, r, "source_matchers", path)
        tgt = _matchers(ck, r, "target_matchers", path)
        if not src or not tgt:
            ck.err(r.line, path, "an inhibit rule needs source_matchers and target_matchers")
        eq = r.get("equal") or []
        if not isinstance(eq, list) or not all(isinstance(x, str) and LABEL_NAME.match(x) for x in eq):
            ck.err(r.line_of("equal"), f"{path}.equal", "equal is a list of label names")
            eq = []
        inhibit.append(InhibitRule(src, tgt, tuple(eq)))
    ams: list[AlertmanagerTarget] = []
    al = doc.get("alertmanagers") or Seq()
    if not isinstance(al, Seq):
        ck.err(doc.line_of("alertmanagers"), "alertmanagers", "alertmanagers is a list")
        al = Seq()
    for i, a in enumerate(al):
        path = f"alertmanagers[{i}]"
        if not isinstance(a, Map):
            ck.err(al.line_of(i), path, "an alertmanager is a mapping with url")
            continue
        ck.keys(a, {"url": "", "timeout": "", "resend_interval": "", "max_attempts": "", "backoff": ""}, path)
        url = a.get("url")
        problem = url_problem(url)
        if problem:
            ck.err(a.line_of("url"), f"{path}.url", problem)
            continue
        t = AlertmanagerTarget(url.rstrip("/"))
        t.timeout = ck.duration(a, "timeout", path, t.timeout)
        t.resend_interval = ck.duration(a, "resend_interval", path, t.resend_interval)
        t.backoff = ck.duration(a, "backoff", path, t.backoff)
        if "max_attempts" in a:
            v = a["max_attempts"]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                ck.err(a.line_of("max_attempts"), f"{path}.max_attempts", "a whole number >= 1")
            else:
                t.max_attempts = v
        ams.append(t)
    if ck.errors or route is None:
        return None, ck.errors
    return Config(route, receivers, inhibit, ams, ext_url, ext_labels), []


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise FileErrors([FileError(str(p), 0, "file", f"cannot read: {e.strerror or e}")]) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FileErrors([FileError(str(p), line, "file", f"not UTF-8 text: byte {data[e.start]:#04x}")]) from None
    cfg, errors = parse_config(text, str(p), p.parent)
    if errors:
        raise FileErrors(errors)
    return cfg


def config_from_text(text: str, file: str = "<config>") -> Config:
    cfg, errors = parse_config(text, file)
    if errors:
        raise FileErrors(errors)
    return cfg

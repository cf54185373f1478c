"""Response policies: which alerts lead the rollout controller to act, and how often.

A policy file (YAML; `vigil rollout --policy FILE`, checked by `vigil rollout check-policy
FILE`) is a list of rules. Each rule matches alerts by their labels with Alertmanager's
matchers and names one action:

    rules:
      - name: fallback-on-critical-quality      # unique; actions are recorded under it
        matchers:                               # all must match the alert's labels
          - severity="critical"                 # =, !=, =~ (regex, anchored), !~
          - category=~"quality|drift"
        action: fallback                        # fallback, retrain, recalibrate, notify-only
        during: watch                           # fallback only: watch (default) or always
        cooldown: 30m                           # per model version, after an action (default 30m)
        limit: 1                                # actions of this rule per model ...
        window: 1h                              # ... in any window this long (default 1 in 1h)
      - name: retrain-on-concept-drift
        matchers: [alertname="ConceptDrift"]
        action: retrain
        url: https://trainer.example/hooks/vigil   # the training pipeline's webhook
        hmac_secret_file: /run/secrets/trainer     # or hmac_secret: (required: the request is signed)
        timeout: 10s
        lookback: 5m                            # the data ranges start this long before the alert did
      - name: recalibrate-on-ece
        matchers: [alertname="HighCalibrationError"]
        action: recalibrate
        min_improvement: 0.01                   # held-out ECE must fall by at least this much

The labels an alert is matched on are its own labels, with `alertname` (the rule's name)
and `severity` added where the alert's labels lack them. Every rule whose matchers all
match acts, each on its own; within a rule, one alert instance (its fingerprint and start
time) acts once, a model version acts again only after the cooldown, and a model at most
`limit` times per `window`. What each action does is the controller's (controller.py).

Every problem is reported as FILE:LINE: FIELD: MESSAGE; a file with errors loads nothing,
so a reload that fails keeps the policy that was running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from eventbus.durations import parse_duration
from eventbus.matchers import Matcher, parse_matcher
from eventbus.yamlpos import FileError, FileErrors, Map, Seq, YamlError, load

FALLBACK, RETRAIN, RECALIBRATE, NOTIFY = "fallback", "retrain", "recalibrate", "notify-only"
ACTIONS = (FALLBACK, RETRAIN, RECALIBRATE, NOTIFY)
WATCH, ALWAYS = "watch", "always"

DEFAULT_COOLDOWN = 30 * 60.0
DEFAULT_WINDOW = 3600.0
DEFAULT_LIMIT = 1

_COMMON = ("name", "matchers", "action", "cooldown", "limit", "window")
KEYS = {
    FALLBACK: (*_COMMON, "during"),
    RETRAIN: (*_COMMON, "url", "hmac_secret", "hmac_secret_file", "timeout", "lookback"),
    RECALIBRATE: (*_COMMON, "min_improvement", "min_held_out"),
    NOTIFY: _COMMON,
}
ALL_KEYS = tuple(dict.fromkeys(k for keys in KEYS.values() for k in keys))

# A policy file's problems: FILE:LINE: FIELD: MESSAGE, and the refusal that lists them all
# (the name rollout.cli and rollout.service catch).


@dataclass
class PolicyRule:
    name: str
    action: str
    matchers: list[Matcher]
    cooldown: float = DEFAULT_COOLDOWN
    limit: int = DEFAULT_LIMIT
    window: float = DEFAULT_WINDOW
    file: str = ""
    line: int = 0
    during: str = WATCH              # fallback
    url: str = ""                    # retrain
    secret: bytes = field(default=b"", repr=False)
    timeout: float = 10.0
    lookback: float = 0.0
    min_improvement: float = 0.0     # recalibrate
    min_held_out: int = 30

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)

    def describe(self) -> str:
        return f"{self.name} ({self.action} on {', '.join(map(str, self.matchers))})"


@dataclass
class Policy:
    rules: list[PolicyRule] = field(default_factory=list)
    file: str = ""

    def matching(self, labels: Mapping[str, str]) -> list[PolicyRule]:
        return [r for r in self.rules if r.matches(labels)]

    def rule(self, name: str) -> PolicyRule | None:
        return next((r for r in self.rules if r.name == name), None)

    def __len__(self) -> int:
        return len(self.rules)


EMPTY = Policy()


class _Checker:
    def __init__(self, file: str, base: Path):
        self.file, self.base = file, base
        self.errors: list[FileError] = []

    def err(self, line: int, fld: str, msg: str) -> None:
        self.errors.append(FileError(self.file, line, fld, msg))

    def duration(self, m: Map, key: str, path: str, default: float, positive: bool = False) -> float:
        if key not in m:
            return default
        try:
            v = parse_duration(m[key], numbers=True)
        except ValueError as e:
            self.err(m.line_of(key), f"{path}.{key}", str(e))
            return default
        if positive and v <= 0:
            self.err(m.line_of(key), f"{path}.{key}", "must be longer than 0")
        return v

    def number(self, m: Map, key: str, path: str, default: float, minimum: float = 0.0) -> float:
        if key not in m:
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v == v or v in (float("inf"), -float("inf")):
            self.err(m.line_of(key), f"{path}.{key}", f"{v!r} is not a finite number")
            return default
        if v < minimum:
            self.err(m.line_of(key), f"{path}.{key}", f"{v!r} is below {minimum:g}")
            return default
        return float(v)

    def whole(self, m: Map, key: str, path: str, default: int, minimum: int) -> int:
        if key not in m:
            return default
        v = m[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.err(m.line_of(key), f"{path}.{key}", f"{v!r} is not a whole number >= {minimum}")
            return default
        return v


def parse_policy(text: str, file: str = "<policy>", base: Path | None = None) -> Policy:
    """The policy in `text`; FileErrors listing every problem. `base` is where a
    relative hmac_secret_file is looked for (the policy file's folder)."""
    ck = _Checker(file, base or Path("."))
    try:
        doc = load(text)
    except YamlError as e:
        raise FileErrors([FileError(file, e.line, "yaml", e.message)]) from None
    if doc is None:
        doc = Map()
        doc.line, doc.key_lines = 1, {}
    if not isinstance(doc, Map):
        raise FileErrors([FileError(file, getattr(doc, "line", 1), "policy",
                                     "must be a mapping with a `rules:` list")])
    for k in doc:
        if k != "rules":
            ck.err(doc.line_of(k), str(k), f"unknown key {k!r} (known keys: rules)")
    rules: list[PolicyRule] = []
    raw = doc.get("rules")
    if raw is None:
        if "rules" not in doc:
            ck.err(doc.line, "rules", "is missing (an empty policy is `rules: []`)")
        raw = Seq()
    if not isinstance(raw, Seq):
        ck.err(doc.line_of("rules"), "rules", "must be a list of rules")
        raw = Seq()
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"rules[{i}]"
        if not isinstance(item, Map):
            ck.err(raw.line_of(i), path, "must be a mapping (name, matchers, action, ...)")
            continue
        r = _rule(ck, item, path)
        if r is None:
            continue
        if r.name in seen:
            ck.err(item.line_of("name"), f"{path}.name", f"{r.name!r} is already the name of the rule at line "
                                                          f"{seen[r.name]}")
        seen.setdefault(r.name, r.line)
        rules.append(r)
    if ck.errors:
        raise FileErrors(ck.errors)
    return Policy(rules, file)


def _rule(ck: _Checker, m: Map, path: str) -> PolicyRule | None:
    before = len(ck.errors)
    action = m.get("action")
    if "action" not in m:
        ck.err(m.line, f"{path}.action", f"is missing (one of {', '.join(ACTIONS)})")
    elif action not in ACTIONS:
        ck.err(m.line_of("action"), f"{path}.action", f"{action!r} is not one of {', '.join(ACTIONS)}")
    allowed = KEYS.get(action, ALL_KEYS)
    for k in m:
        if k not in allowed:
            where = [a for a, keys in KEYS.items() if k in keys]
            hint = (f"only for action {' or '.join(where)}" if where and action in ACTIONS
                    else f"known keys: {', '.join(allowed)}")
            ck.err(m.line_of(k), f"{path}.{k}", f"unknown key {k!r} ({hint})")
    name = m.get("name")
    if "name" not in m:
        ck.err(m.line, f"{path}.name", "is missing")
    elif not isinstance(name, str) or not name.strip():
        ck.err(m.line_of("name"), f"{path}.name", f"{name!r} is not a non-empty string")
    matchers = []
    raw = m.get("matchers")
    if "matchers" not in m:
        ck.err(m.line, f"{path}.matchers", 'is missing (at least one, e.g. severity="critical")')
    elif not isinstance(raw, Seq) or not raw:
        ck.err(m.line_of("matchers"), f"{path}.matchers", 'must be a non-empty list of matchers like '
                                                          'severity="critical"')
    else:
        for j, text in enumerate(raw):
            if not isinstance(text, str):
                ck.err(raw.line_of(j), f"{path}.matchers[{j}]", f'{text!r} is not a matcher string like '
                                                                 'severity="critical"')
                continue
            try:
                matchers.append(parse_matcher(text))
            except ValueError as e:
                ck.err(raw.line_of(j), f"{path}.matchers[{j}]", str(e))
    r = PolicyRule(name=name if isinstance(name, str) else "", action=action if action in ACTIONS else "",
                   matchers=matchers, file=ck.file, line=m.line)
    r.cooldown = ck.duration(m, "cooldown", path, DEFAULT_COOLDOWN)
    r.window = ck.duration(m, "window", path, DEFAULT_WINDOW, positive=True)
    r.limit = ck.whole(m, "limit", path, DEFAULT_LIMIT, 1)
    if action == FALLBACK and "during" in m:
        if m["during"] not in (WATCH, ALWAYS):
            ck.err(m.line_of("during"), f"{path}.during", f"{m['during']!r} is not {WATCH} (only while the "
                                                           f"previous version is watched after a promotion) or "
                                                           f"{ALWAYS} (whenever there is a previous version)")
        else:
            r.during = m["during"]
    if action == RETRAIN:
        _retrain(ck, m, path, r)
    if action == RECALIBRATE:
        r.min_improvement = ck.number(m, "min_improvement", path, 0.0)
        r.min_held_out = ck.whole(m, "min_held_out", path, 30, 1)
    return r if len(ck.errors) == before else None


def _retrain(ck: _Checker, m: Map, path: str, r: PolicyRule) -> None:
    url = m.get("url")
    if "url" not in m:
        ck.err(m.line, f"{path}.url", "is missing (the training pipeline's webhook)")
    elif not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        ck.err(m.line_of("url"), f"{path}.url", f"{url!r} is not an http:// or https:// URL")
    else:
        r.url = url
    if "hmac_secret" in m and "hmac_secret_file" in m:
        ck.err(m.line_of("hmac_secret"), f"{path}.hmac_secret", "give hmac_secret or hmac_secret_file, not both")
    elif "hmac_secret" in m:
        s = m["hmac_secret"]
        if not isinstance(s, str) or not s:
            ck.err(m.line_of("hmac_secret"), f"{path}.hmac_secret", "is not a non-empty string")
        else:
            r.secret = s.encode()
    elif "hmac_secret_file" in m:
        f = m["hmac_secret_file"]
        if not isinstance(f, str) or not f:
            ck.err(m.line_of("hmac_secret_file"), f"{path}.hmac_secret_file", "is not a file name")
        else:
            p = Path(f) if Path(f).is_absolute() else ck.base / f
            try:
                r.secret = p.read_bytes().strip()
            except OSError as e:
                ck.err(m.line_of("hmac_secret_file"), f"{path}.hmac_secret_file", f"cannot read {p}: {e.strerror}")
            else:
                if not r.secret:
                    ck.err(m.line_of("hmac_secret_file"), f"{path}.hmac_secret_file", f"{p} is empty")
    else:
        ck.err(m.line, f"{path}.hmac_secret", "is missing: a retrain request is signed (hmac_secret or "
                                               "hmac_secret_file)")
    r.timeout = ck.duration(m, "timeout", path, 10.0, positive=True)
    r.lookback = ck.duration(m, "lookback", path, 0.0)


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FileErrors([FileError(str(p), 0, "file", f"cannot read: {getattr(e, 'strerror', None) or e}")]) \
            from None
    return parse_policy(text, str(p), p.parent)


DEFAULT_POLICY = Path(__file__).with_name("default_policy.yml")

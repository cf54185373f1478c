"""Alerting rules over signals, in YAML shaped like Prometheus alerting rules, and their
validator (`vigil alerting check-rules`).

    groups:
      - name: drift
        rules:
          - alert: FeatureDrift
            signal:                      # a condition over single signals
              detector: ks               # matchers: "ks", "=~ks|psi", "!=adwin", "!~x.*"
              feature: mean_logprob
              model: "=~smollm2.*"       # detector, feature, model, version
              drifted: true              # tests, all must hold: drifted,
              p_value: "< 0.01"          #   statistic and p_value ("> 0.2", "<= 1e-3", ...)
            for: 2m
            keep_firing_for: 10m
            labels: {severity: warning}
            annotations:
              summary: "{{ $labels.feature }} of {{ $labels.model }} drifted (p={{ $value }})"
          - alert: HighECE
            metric:                      # a condition over a windowed metric
              name: ece                  # or detector/feature matchers; see vocabulary.METRICS
              window: 10m                # aggregate the signals' statistic over this window
              aggregate: mean            # last, mean, max, min, sum, count
              above: 0.1                 # or below:
            for: 5m

A signal condition without a test means `drifted: true`. `$value` is the statistic of the
signal that decided (the aggregate for a metric). `stale_after` (default 15m) ends a
condition whose signals stopped coming, as a vanished series ends a Prometheus alert.

Every problem is reported with file, line and field; a file with errors loads nothing.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .templates import Template, TemplateError
from .vocabulary import AGGREGATES, DEFAULT, Vocabulary, did_you_mean
from eventbus.durations import parse_duration
from eventbus.matchers import LABEL_NAME, Matcher
from eventbus.yamlpos import FileError, FileErrors, Map, Seq, YamlError, load

SIGNAL_LABELS = ("detector", "feature", "model", "version")
DEFAULT_STALE_AFTER = 15 * 60.0

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
        "==": operator.eq, "!=": operator.ne}
_TEST = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)\s*$", re.I)


# A rule file's problems: FILE:LINE: FIELD: MESSAGE, and the refusal that lists them all
# (the names the alerting package exports).


@dataclass
class Rule:
    name: str
    group: str
    file: str
    line: int
    kind: str  # "signal" or "metric"
    matchers: dict[str, Matcher]
    predicate: Callable  # (signal) -> bool for signal rules; (value) -> bool for metric rules
    for_: float = 0.0
    keep_firing_for: float = 0.0
    stale_after: float = DEFAULT_STALE_AFTER
    labels: dict[str, Template] = field(default_factory=dict)
    annotations: dict[str, Template] = field(default_factory=dict)
    window: float = 0.0
    aggregate: str = "last"
    test_text: str = ""
    index: int = 0

    @property
    def labels_use_value(self) -> bool:
        return any("$value" in t.source or ".Value" in t.source for t in self.labels.values())

    @property
    def exact_detector(self) -> str | None:
        m = self.matchers.get("detector")
        return m.value if m is not None and m.op == "=" else None

    def matches(self, sig) -> bool:
        for name, m in self.matchers.items():
            if not m.matches_value(getattr(sig, name)):
                return False
        return True


@dataclass
class RuleSet:
    rules: list[Rule]
    files: list[str]

    def __len__(self) -> int:
        return len(self.rules)


class _Checker:
    def __init__(self, file: str, vocab: Vocabulary):
        self.file = file
        self.vocab = vocab
        self.errors: list[FileError] = []

    def err(self, line: int, fld: str, msg: str) -> None:
        self.errors.append(FileError(self.file, line, fld, msg))

    def keys(self, m: Map, allowed: dict[str, str], path: str, hints: dict[str, str] | None = None) -> None:
        for k in m:
            if k not in allowed:
                hint = (hints or {}).get(k, f"known keys: {', '.join(allowed)}")
                self.err(m.line_of(k), f"{path}.{k}" if path else str(k), f"unknown key {k!r} ({hint})")

    def duration(self, m: Map, key: str, path: str, default: float) -> float:
        if key not in m:
            return default
        try:
            v = parse_duration(m[key])
        except ValueError as e:
            self.err(m.line_of(key), f"{path}.{key}", str(e))
            return default
        return v

    def matcher(self, m: Map, key: str, path: str) -> Matcher | None:
        raw = m[key]
        line = m.line_of(key)
        fld = f"{path}.{key}"
        if not isinstance(raw, str):
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                raw = str(raw)
            else:
                self.err(line, fld, f"a matcher is a string, not {type(raw).__name__}")
                return None
        op, value = "=", raw
        for o in ("=~", "!~", "!=", "="):
            if raw.startswith(o):
                op, value = o, raw[len(o):]
                break
        try:
            mt = Matcher(key, op, value)
        except re.error as e:
            self.err(line, fld, f"bad regular expression {value!r}: {e}")
            return None
        if key in ("detector", "feature"):
            known = self.vocab.names(key)
            if op == "=" and not self.vocab.knows(key, value):
                self.err(line, fld, f"no processor publishes the {key} {value!r}" + did_you_mean(value, known))
                return None
            if op == "=~" and not any(mt.matches_value(n) for n in known):
                self.err(line, fld, f"regular expression {value!r} matches no published {key}")
                return None
        return mt

    def series(self, m: Map, matchers: dict[str, Matcher], path: str) -> None:
        """A detector and a feature that are each published must also be published together."""
        d, f = matchers.get("detector"), matchers.get("feature")
        if d is None or f is None or any(d.matches_value(a) and f.matches_value(b) for a, b in self.vocab.series):
            return
        if any(d.matches_value(a) for a in self.vocab.own_detectors) or \
                any(f.matches_value(b) for b in self.vocab.own_features):
            return
        published = sorted({b for a, b in self.vocab.series if d.matches_value(a)})
        self.err(m.line_of("feature") if "feature" in m else m.line, f"{path}.feature",
                 f"no processor publishes feature {f.value!r} for detector {d.value!r} "
                 f"(it publishes: {', '.join(published)})")

    def test(self, m: Map, key: str, path: str):
        raw = m[key]
        mt = _TEST.match(raw) if isinstance(raw, str) else None
        if not mt:
            self.err(m.line_of(key), f"{path}.{key}",
                     f"bad test {raw!r}: want an operator and a number, such as \"> 0.2\" or \"< 0.01\"")
            return None
        return _OPS[mt.group(1)], float(mt.group(2)), raw.strip()

    def templates(self, m, key: str, path: str, labels: bool) -> dict[str, Template]:
        out: dict[str, Template] = {}
        if key not in m:
            return out
        block = m[key]
        if block is None:
            return out
        if not isinstance(block, Map):
            self.err(m.line_of(key), f"{path}.{key}", f"{key} is a mapping of names to strings")
            return out
        for name, raw in block.items():
            line = block.line_of(name)
            fld = f"{path}.{key}.{name}"
            if not isinstance(name, str) or not LABEL_NAME.match(name):
                self.err(line, fld, f"invalid {key[:-1]} name {name!r}")
                continue
            if labels and name == "alertname":
                self.err(line, fld, "alertname comes from the rule's `alert` and cannot be set here")
                continue
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                raw = str(raw)
            if not isinstance(raw, str):
                self.err(line, fld, f"a {key[:-1]} value is a string (a template), not {type(raw).__name__}")
                continue
            try:
                out[name] = Template(raw)
            except TemplateError as e:
                self.err(line, fld, f"broken template: {e}")
        return out


RULE_KEYS = {"alert": "", "signal": "", "metric": "", "for": "", "keep_firing_for": "",
             "stale_after": "", "labels": "", "annotations": ""}
RULE_HINTS = {"expr": "Vigil rules take `signal:` or `metric:` instead of a PromQL expr; PromQL rules belong "
                      "in deploy/prometheus-rules.yml",
              "record": "Vigil has alerting rules only"}
SIGNAL_KEYS = {k: "" for k in ("detector", "feature", "model", "version", "drifted", "statistic", "p_value")}
METRIC_KEYS = {k: "" for k in ("name", "detector", "feature", "model", "version", "window", "aggregate",
                               "above", "below")}


def _signal_predicate(drifted, tests) -> Callable:
    if drifted is not None and not tests:
        want = bool(drifted)
        return lambda s: s.drifted is want
    checks = []
    for attr, (op, value, _) in tests:
        checks.append((attr, op, value))

    def pred(s, want=drifted, checks=tuple(checks)):
        if want is not None and s.drifted is not want:
            return False
        for attr, op, value in checks:
            v = getattr(s, attr)
            if v is None or not op(v, value):
                return False
        return True
    return pred


def parse_rules(text: str, file: str = "<rules>", vocab: Vocabulary = DEFAULT) -> tuple[list[Rule], list[FileError]]:
    ck = _Checker(file, vocab)
    try:
        doc = load(text)
    except YamlError as e:
        ck.err(e.line, "yaml", e.message)
        return [], ck.errors
    if doc is None:
        return [], []
    if not isinstance(doc, Map):
        ck.err(getattr(doc, "line", 1), "(top)", "a rules file is a mapping with a `groups` list")
        return [], ck.errors
    ck.keys(doc, {"groups": ""}, "")
    groups = doc.get("groups")
    if groups is None:
        ck.err(doc.line, "groups", "missing `groups`")
        return [], ck.errors
    if not isinstance(groups, Seq):
        ck.err(doc.line_of("groups"), "groups", "`groups` is a list")
        return [], ck.errors
    rules: list[Rule] = []
    seen_groups: dict[str, int] = {}
    for gi, g in enumerate(groups):
        gpath = f"groups[{gi}]"
        if not isinstance(g, Map):
            ck.err(groups.line_of(gi), gpath, "a group is a mapping with `name` and `rules`")
            continue
        ck.keys(g, {"name": "", "rules": ""}, gpath)
        gname = g.get("name")
        if not isinstance(gname, str) or not gname:
            ck.err(g.line_of("name"), f"{gpath}.name", "a group needs a non-empty `name`")
            gname = f"#{gi}"
        elif gname in seen_groups:
            ck.err(g.line_of("name"), f"{gpath}.name", f"group name {gname!r} repeated (first on line {seen_groups[gname]})")
        else:
            seen_groups[gname] = g.line_of("name")
        rlist = g.get("rules")
        if not isinstance(rlist, Seq):
            ck.err(g.line_of("rules"), f"{gpath}.rules", "a group needs a `rules` list")
            continue
        for ri, r in enumerate(rlist):
            rpath = f"{gpath}.rules[{ri}]"
            rule = _parse_rule(ck, r, rpath, rlist.line_of(ri), gname, file)
            if rule is not None:
                rules.append(rule)
    return rules, ck.errors


def _parse_rule(ck: _Checker, r, rpath: str, line: int, gname: str, file: str) -> Rule | None:
    if not isinstance(r, Map):
        ck.err(line, rpath, "a rule is a mapping")
        return None
    nerr = len(ck.errors)
    name = r.get("alert")
    if not isinstance(name, str) or not LABEL_NAME.match(name or ""):
        ck.err(r.line_of("alert"), f"{rpath}.alert",
               "missing `alert`" if name is None else f"invalid alert name {name!r} (letters, digits, _)")
        name = "?"
    else:
        rpath = f"{rpath}({name})"
    ck.keys(r, RULE_KEYS, rpath, RULE_HINTS)
    has_sig, has_met = "signal" in r, "metric" in r
    if has_sig == has_met:
        ck.err(r.line, rpath, "a rule needs exactly one of `signal` or `metric`")
    for_ = ck.duration(r, "for", rpath, 0.0)
    keep = ck.duration(r, "keep_firing_for", rpath, 0.0)
    stale = ck.duration(r, "stale_after", rpath, DEFAULT_STALE_AFTER)
    if "stale_after" in r and stale <= 0:
        ck.err(r.line_of("stale_after"), f"{rpath}.stale_after", "stale_after must be positive")
    labels = ck.templates(r, "labels", rpath, labels=True)
    annotations = ck.templates(r, "annotations", rpath, labels=False)

    matchers: dict[str, Matcher] = {}
    predicate: Callable | None = None
    kind, window, aggregate, test_text = "signal", 0.0, "last", ""
    if has_sig and not has_met:
        s = r["signal"]
        spath = f"{rpath}.signal"
        if not isinstance(s, Map):
            ck.err(r.line_of("signal"), spath, "`signal` is a mapping of matchers and tests")
        else:
            ck.keys(s, SIGNAL_KEYS, spath)
            for k in SIGNAL_LABELS:
                if k in s:
                    mt = ck.matcher(s, k, spath)
                    if mt is not None:
                        matchers[k] = mt
            ck.series(s, matchers, spath)
            drifted = None
            if "drifted" in s:
                if not isinstance(s["drifted"], bool):
                    ck.err(s.line_of("drifted"), f"{spath}.drifted", "drifted is true or false")
                else:
                    drifted = s["drifted"]
            tests = []
            for k in ("statistic", "p_value"):
                if k in s:
                    t = ck.test(s, k, spath)
                    if t:
                        tests.append((k, t))
            if drifted is None and not tests:
                drifted = True
            test_text = " and ".join([f"drifted is {str(drifted).lower()}"] * (drifted is not None)
                                     + [f"{k} {t[2]}" for k, t in tests])
            predicate = _signal_predicate(drifted, tests)
    elif has_met and not has_sig:
        kind = "metric"
        m = r["metric"]
        mpath = f"{rpath}.metric"
        if not isinstance(m, Map):
            ck.err(r.line_of("metric"), mpath, "`metric` is a mapping")
        else:
            ck.keys(m, METRIC_KEYS, mpath)
            aggregate = "last"
            if "name" in m:
                spec = ck.vocab.metrics.get(m["name"]) if isinstance(m["name"], str) else None
                if spec is None:
                    ck.err(m.line_of("name"), f"{mpath}.name", f"no processor publishes the metric {m['name']!r}"
                           + did_you_mean(str(m["name"]), sorted(ck.vocab.metrics)))
                else:
                    for k in ("detector", "feature"):
                        if k in spec:
                            matchers[k] = Matcher(k, "=", spec[k])
                    aggregate = spec.get("aggregate", "last")
                    for k in ("detector", "feature"):
                        if k in m:
                            ck.err(m.line_of(k), f"{mpath}.{k}", f"`{k}` comes from the metric name; give one or the other")
            elif "detector" not in m:
                ck.err(m.line, mpath, "a metric needs `name` or a `detector` matcher")
            for k in SIGNAL_LABELS:
                if k in m and k not in matchers:
                    mt = ck.matcher(m, k, mpath)
                    if mt is not None:
                        matchers[k] = mt
            ck.series(m, matchers, mpath)
            window = ck.duration(m, "window", mpath, 0.0)
            if "aggregate" in m:
                if m["aggregate"] not in AGGREGATES:
                    ck.err(m.line_of("aggregate"), f"{mpath}.aggregate",
                           f"unknown aggregate {m['aggregate']!r} (have {', '.join(AGGREGATES)})")
                else:
                    aggregate = m["aggregate"]
            if aggregate != "last" and window <= 0:
                ck.err(m.line_of("aggregate") if "aggregate" in m else m.line, f"{mpath}.window",
                       f"aggregate {aggregate!r} needs a `window`")
            has_above, has_below = "above" in m, "below" in m
            if has_above == has_below:
                ck.err(m.line, mpath, "a metric needs exactly one of `above` or `below`")
            else:
                k = "above" if has_above else "below"
                v = m[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    ck.err(m.line_of(k), f"{mpath}.{k}", f"{k} is a number, not {v!r}")
                else:
                    thr = float(v)
                    predicate = (lambda x, t=thr: x > t) if has_above else (lambda x, t=thr: x < t)
                    test_text = f"{aggregate}({window:g}s) {'>' if has_above else '<'} {thr:g}"
    if len(ck.errors) > nerr or predicate is None:
        return None
    return Rule(name=name, group=gname, file=file, line=line, kind=kind, matchers=matchers, predicate=predicate,
                for_=for_, keep_firing_for=keep, stale_after=stale, labels=labels, annotations=annotations,
                window=window, aggregate=aggregate, test_text=test_text)


def check_files(paths: list[str | Path], vocab: Vocabulary = DEFAULT) -> tuple[list[Rule], list[FileError]]:
    rules: list[Rule] = []
    errors: list[FileError] = []
    for p in paths:
        p = str(p)
        try:
            text = Path(p).read_text()
        except OSError as e:
            errors.append(FileError(p, 0, "file", f"cannot read: {e.strerror or e}"))
            continue
        rs, es = parse_rules(text, p, vocab)
        rules.extend(rs)
        errors.extend(es)
    return rules, errors


def load_rules(paths: list[str | Path], vocab: Vocabulary = DEFAULT) -> RuleSet:
    """All the rules of these files, or FileErrors with every problem found."""
    rules, errors = check_files(paths, vocab)
    if errors:
        raise FileErrors(errors)
    for i, r in enumerate(rules):
        r.index = i
    return RuleSet(rules, [str(p) for p in paths])


def rules_from_text(text: str, file: str = "<rules>", vocab: Vocabulary = DEFAULT) -> RuleSet:
    rules, errors = parse_rules(text, file, vocab)
    if errors:
        raise FileErrors(errors)
    for i, r in enumerate(rules):
        r.index = i
    return RuleSet(rules, [file])

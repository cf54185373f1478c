"""The rule engine: signals in, alert state changes out. Pure and synchronous; time comes
from the clock (or the `now` a caller passes), so every timer is exact under test.

Per alert instance (a rule and the series of the signals it matches: model, version,
detector, feature and the series labels of eventbus/signals.py; what else a signal
carries changes per reading and never splits an instance):

    inactive --cond--> pending --cond held `for`--> firing --cond false `keep_firing_for`--> resolved
    pending --cond false--> inactive          firing --cond true again--> firing (same alert)
    resolved --cond--> pending (a new alert)  resolved --retention--> inactive (forgotten)

"cond false" is a signal that fails the rule's test, or no signal for `stale_after`.
Every transition is a StateChange (the vigil.alerts record); firing and resolved alerts go
to `on_alert` (the dispatcher). Timers sit in one heap; a signal for an alert that is
already firing costs a dictionary look-up and a test, never a heap operation.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from typing import Callable, Iterable
from urllib.parse import quote

from eventbus.signals import series_labels

from .labels import fingerprint
from .rules import Rule, RuleSet
from .signals import FIRING, INACTIVE, PENDING, RESOLVED, Alert, Signal, StateChange

DEFAULT_RESOLVED_RETENTION = 15 * 60.0


def rule_identity(r: Rule) -> tuple:
    return (r.group, r.name, r.kind, r.test_text, r.window, r.aggregate,
            tuple(sorted(str(m) for m in r.matchers.values())))


class Instance:
    __slots__ = ("rule", "key", "labels", "fp", "state", "active_at", "fired_at", "false_since",
                 "last_signal", "value", "annotations", "resolved_at", "deadline", "window", "wsum", "sig_labels")

    def __init__(self, rule: Rule, key: tuple, sig_labels: dict[str, str], labels: dict[str, str],
                 fp: int | None = None):
        self.rule = rule
        self.key = key
        self.sig_labels = sig_labels
        self.labels = labels
        self.fp = fingerprint(labels) if fp is None else fp
        self.state = INACTIVE
        self.active_at = None
        self.fired_at = None
        self.false_since = None
        self.resolved_at = None
        self.last_signal = 0.0
        self.value = math.nan
        self.annotations: dict[str, str] = {}
        self.deadline = None
        self.window: deque | None = deque() if rule.kind == "metric" and rule.window > 0 else None
        self.wsum = 0.0


class RuleEngine:
    def __init__(self, rules: RuleSet, clock, *, on_change: Callable[[StateChange], None] | None = None,
                 on_alert: Callable[[Alert], None] | None = None, external_url: str = "",
                 external_labels: dict[str, str] | None = None,
                 resolved_retention: float = DEFAULT_RESOLVED_RETENTION):
        self.clock = clock
        self.on_change = on_change or (lambda c: None)
        self.on_alert = on_alert or (lambda a: None)
        self.external_url = external_url.rstrip("/")
        self.external_labels = dict(external_labels or {})
        self.resolved_retention = resolved_retention
        self.instances: dict[tuple, Instance] = {}
        self._heap: list[tuple[float, int, Instance]] = []
        self._seq = itertools.count()
        self.signals_seen = 0
        self.signals_matched = 0
        self._set_rules(rules)

    # -- rules ---------------------------------------------------------------------
    def _set_rules(self, rules: RuleSet) -> None:
        self.rules = rules
        by_det: dict[str, list[Rule]] = {}
        wild: list[Rule] = []
        for r in rules.rules:
            d = r.exact_detector
            (by_det.setdefault(d, []) if d is not None else wild).append(r)
        self._by_detector = by_det
        self._wild = wild
        self._candidates: dict[str, tuple] = {}
        self._label_cache: dict[tuple, tuple] = {}
        # per rule: matchers still to check once the detector index has matched
        self._checks = {}
        for r in rules.rules:
            checks = []
            for name, m in r.matchers.items():
                if name == "detector" and m.op == "=":
                    continue
                if m.op == "=":
                    checks.append((name, m.value, None))
                else:
                    checks.append((name, None, m))
            self._checks[r.index] = tuple(checks)

    def replace_rules(self, rules: RuleSet, now: float | None = None) -> None:
        """Swap the rule set (a reload). Instances of rules that are still there, unchanged
        in what they test, keep their state; the others are resolved if firing, then forgotten."""
        now = self.clock.now() if now is None else now
        by_id = {rule_identity(r): r for r in rules.rules}
        old = self.instances
        self._set_rules(rules)
        self.instances = {}
        for key, inst in old.items():
            r = by_id.get(rule_identity(inst.rule))
            if r is None:
                if inst.state == FIRING:
                    self._resolve(inst, now)
                elif inst.state == PENDING:
                    self._transition(inst, INACTIVE, now)
                continue
            inst.rule = r
            newkey = (r.index,) + key[1:]
            inst.key = newkey
            self.instances[newkey] = inst
            inst.deadline = None
            self._reschedule(inst)

    def _candidates_for(self, detector: str) -> tuple:
        c = self._candidates.get(detector)
        if c is None:
            c = tuple(self._by_detector.get(detector, ())) + tuple(self._wild)
            self._candidates[detector] = c
        return c

    # -- signals -------------------------------------------------------------------
    def ingest(self, sig: Signal, now: float | None = None) -> None:
        if now is None:
            now = self.clock.now()
        self.signals_seen += 1
        if self._heap and self._heap[0][0] <= now:
            self.advance(now)
        cands = self._candidates.get(sig.detector)
        if cands is None:
            cands = self._candidates_for(sig.detector)
        for rule in cands:
            ok = True
            for name, exact, m in self._checks[rule.index]:
                v = getattr(sig, name)
                if exact is not None:
                    if v != exact:
                        ok = False
                        break
                elif not m.matches_value(v):
                    ok = False
                    break
            if not ok:
                continue
            self.signals_matched += 1
            labels = series_labels(sig.labels) if sig.labels else None
            if labels:
                key = (rule.index, sig.detector, sig.feature, sig.model, sig.version, tuple(sorted(labels.items())))
            else:
                key = (rule.index, sig.detector, sig.feature, sig.model, sig.version)
            inst = self.instances.get(key)
            if rule.kind == "signal":
                cond = rule.predicate(sig)
                value = sig.statistic
                if inst is None:
                    if not cond:
                        continue
                    inst = self._create(rule, key, sig, value)
                elif cond and inst.state == FIRING:
                    # the hot path of a storm: an alert that is firing stays firing
                    inst.last_signal = now
                    inst.value = value
                    inst.false_since = None
                    continue
            else:
                if inst is None:
                    inst = self._create(rule, key, sig, sig.statistic)
                value = self._window_value(inst, sig.statistic, now)
                cond = rule.predicate(value)
            self._update(inst, cond, value, now)

    def _window_value(self, inst: Instance, x: float, now: float) -> float:
        rule = inst.rule
        w = inst.window
        if w is None:
            return x if rule.aggregate == "last" else (1.0 if rule.aggregate == "count" else x)
        w.append((now, x))
        inst.wsum += x
        horizon = now - rule.window
        while w and w[0][0] <= horizon:
            inst.wsum -= w.popleft()[1]
        agg = rule.aggregate
        if agg == "last":
            return x
        if agg == "mean":
            return inst.wsum / len(w)
        if agg == "sum":
            return inst.wsum
        if agg == "count":
            return float(len(w))
        if agg == "max":
            return max(v for _, v in w)
        return min(v for _, v in w)

    def _create(self, rule: Rule, key: tuple, sig: Signal, value: float) -> Instance:
        cached = self._label_cache.get(key)
        if cached is not None and not rule.labels_use_value:
            sig_labels, labels, fp = cached
            inst = Instance(rule, key, sig_labels, labels, fp)
            self.instances[key] = inst
            return inst
        sig_labels = series_labels(sig.labels) if sig.labels else {}
        sig_labels.update((k, v) for k, v in (("detector", sig.detector), ("feature", sig.feature),
                                              ("model", sig.model), ("version", sig.version)) if v)
        labels = dict(sig_labels)
        for name, t in rule.labels.items():
            labels[name] = t.render(sig_labels, value, self.external_labels, self.external_url)
        labels["alertname"] = rule.name
        inst = Instance(rule, key, sig_labels, labels)
        if len(self._label_cache) >= 100_000:  # a series that flaps comes back: keep its labels and fingerprint
            self._label_cache.clear()
        self._label_cache[key] = (sig_labels, labels, inst.fp)
        self.instances[key] = inst
        return inst

    def _update(self, inst: Instance, cond: bool, value: float, now: float) -> None:
        inst.last_signal = now
        inst.value = value
        rule = inst.rule
        st = inst.state
        if cond:
            inst.false_since = None
            if st == INACTIVE or st == RESOLVED:
                inst.active_at = now
                inst.fired_at = None
                inst.resolved_at = None
                self._transition(inst, PENDING, now)
                if rule.for_ <= 0:
                    self._fire(inst, now)
            elif st == PENDING and now >= inst.active_at + rule.for_:
                self._fire(inst, now)
        else:
            if st == PENDING:
                self._transition(inst, INACTIVE, now)
            elif st == FIRING:
                if inst.false_since is None:
                    inst.false_since = now
                if now >= inst.false_since + rule.keep_firing_for:
                    self._resolve(inst, now)
            if inst.state == INACTIVE and inst.window is None:
                self._forget(inst)
                return
        self._reschedule(inst)

    def _forget(self, inst: Instance) -> None:
        """Drop an instance: its timers go with it, and a newer instance of the same series
        (one that came back within the same instant) is left alone."""
        inst.deadline = None
        if self.instances.get(inst.key) is inst:
            del self.instances[inst.key]

    # -- transitions ----------------------------------------------------------------
    def _render(self, inst: Instance) -> dict[str, str]:
        return {k: t.render(inst.labels, inst.value, self.external_labels, self.external_url)
                for k, t in inst.rule.annotations.items()}

    def _transition(self, inst: Instance, state: str, at: float) -> None:
        prev = inst.state
        inst.state = state
        if state in (FIRING, RESOLVED) or (state == PENDING and inst.rule.for_ > 0):
            inst.annotations = self._render(inst)
        self.on_change(StateChange(
            fingerprint=f"{inst.fp:016x}", rule=inst.rule.name, state=state, previous=prev, at=at,
            labels=inst.labels, annotations=inst.annotations, value=inst.value, active_at=inst.active_at,
            starts_at=inst.fired_at, ends_at=inst.resolved_at))

    def generator_url(self, rule: Rule) -> str:
        base = self.external_url or ""
        return f"{base}/api/v1/rules?group={quote(rule.group)}&alert={quote(rule.name)}"

    def alert_of(self, inst: Instance, at: float) -> Alert:
        """The alert a dispatcher groups and sends for `inst`, as of `at`."""
        return Alert(labels=inst.labels, annotations=inst.annotations, starts_at=inst.fired_at,
                     ends_at=inst.resolved_at, fingerprint=inst.fp,
                     generator_url=self.generator_url(inst.rule), updated_at=at)

    def _fire(self, inst: Instance, at: float) -> None:
        inst.fired_at = at
        self._transition(inst, FIRING, at)
        self.on_alert(self.alert_of(inst, at))

    def _resolve(self, inst: Instance, at: float) -> None:
        inst.resolved_at = at
        self._transition(inst, RESOLVED, at)
        self.on_alert(self.alert_of(inst, at))

    # -- timers ---------------------------------------------------------------------
    def _next_deadline(self, inst: Instance) -> float | None:
        r = inst.rule
        st = inst.state
        if st == PENDING:
            return min(inst.active_at + r.for_, inst.last_signal + r.stale_after)
        if st == FIRING:
            if inst.false_since is not None:
                return inst.false_since + r.keep_firing_for
            return inst.last_signal + r.stale_after
        if st == RESOLVED:
            return inst.resolved_at + self.resolved_retention
        if inst.window is not None:
            return inst.last_signal + max(r.window, r.stale_after)
        return None

    def _reschedule(self, inst: Instance) -> None:
        t = self._next_deadline(inst)
        if t is not None and (inst.deadline is None or t < inst.deadline):
            inst.deadline = t
            heapq.heappush(self._heap, (t, next(self._seq), inst))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and heap[0][2].deadline != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def advance(self, now: float | None = None) -> None:
        """Run every timer due at or before `now`, in order, each at its own time."""
        if now is None:
            now = self.clock.now()
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, inst = heapq.heappop(heap)
            if inst.deadline != t:
                continue
            inst.deadline = None
            self._evaluate(inst, t)

    def _evaluate(self, inst: Instance, t: float) -> None:
        r = inst.rule
        st = inst.state
        stale_at = inst.last_signal + r.stale_after
        if st == PENDING:
            if stale_at <= t:
                self._transition(inst, INACTIVE, stale_at)
            elif t >= inst.active_at + r.for_:
                self._fire(inst, inst.active_at + r.for_)
        elif st == FIRING:
            if inst.false_since is None and stale_at <= t:
                inst.false_since = stale_at
            if inst.false_since is not None and t >= inst.false_since + r.keep_firing_for:
                self._resolve(inst, inst.false_since + r.keep_firing_for)
        elif st == RESOLVED:
            if t >= inst.resolved_at + self.resolved_retention:
                self._transition(inst, INACTIVE, t)
                self._forget(inst)
                return
        elif inst.window is not None and inst.last_signal + max(r.window, r.stale_after) <= t:
            self._forget(inst)
            return
        if inst.state == INACTIVE and inst.window is None:
            self._forget(inst)
            return
        self._reschedule(inst)

    # -- views and persistence -------------------------------------------------------
    def alerts(self, states: Iterable[str] = (PENDING, FIRING, RESOLVED)) -> list[Instance]:
        states = set(states)
        return [i for i in self.instances.values() if i.state in states]

    def firing_alerts(self) -> list[Alert]:
        return [self._alert(i, i.fired_at) for i in self.instances.values() if i.state == FIRING]

    def snapshot(self) -> dict:
        """Everything a restarted engine needs (JSON-able): the instances and their timers."""
        out = []
        for inst in self.instances.values():
            if inst.state == INACTIVE and not inst.window:
                continue
            out.append({
                "rule": list(rule_identity(inst.rule)), "key": list(inst.key[1:]), "labels": inst.labels,
                "state": inst.state, "active_at": inst.active_at, "fired_at": inst.fired_at,
                "false_since": inst.false_since, "resolved_at": inst.resolved_at,
                "last_signal": inst.last_signal, "value": inst.value if math.isfinite(inst.value) else None,
                "annotations": inst.annotations,
                "window": [list(p) for p in inst.window] if inst.window is not None else None,
            })
        return {"version": 1, "instances": out}

    def restore(self, snap: dict) -> int:
        """Load a snapshot taken by `snapshot` (before any signal). Instances of rules that
        are gone are dropped. Returns how many were restored. Emits nothing: what was
        announced before the restart is not announced again."""
        by_id = {rule_identity(r): r for r in self.rules.rules}
        n = 0
        for d in snap.get("instances", []):
            ident = d["rule"]
            ident = tuple(tuple(x) if isinstance(x, list) else x for x in ident)
            r = by_id.get(ident)
            if r is None:
                continue
            parts = d["key"]
            extra = tuple(tuple(p) for p in parts[4]) if len(parts) > 4 else ()
            key = (r.index,) + tuple(parts[:4]) + ((extra,) if len(parts) > 4 else ())
            sig_labels = {k: v for k, v in extra}
            sig_labels.update((k, v) for k, v in zip(("detector", "feature", "model", "version"), parts) if v)
            inst = Instance(r, key, sig_labels, dict(d["labels"]))
            inst.state = d["state"]
            inst.active_at, inst.fired_at = d["active_at"], d["fired_at"]
            inst.false_since, inst.resolved_at = d["false_since"], d["resolved_at"]
            inst.last_signal = d["last_signal"]
            inst.value = d["value"] if d["value"] is not None else math.nan
            inst.annotations = dict(d["annotations"])
            if d.get("window") is not None and inst.window is not None:
                for t, v in d["window"]:
                    inst.window.append((t, v))
                    inst.wsum += v
            self.instances[key] = inst
            self._reschedule(inst)
            n += 1
        return n

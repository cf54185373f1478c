"""From alerts to notifications, as Alertmanager's dispatcher and notification pipeline do
it: route each alert down the tree, put it in the aggregation group its route's
`group_by` labels name, and flush each group on its own timer (first after `group_wait`,
then every `group_interval`). A flush drops inhibited and silenced alerts, asks the
notification log whether anything changed (or `repeat_interval` passed), asks the
receiver's throttle, and only then produces a Notification per receiver integration.

Throttling: a receiver may have `throttle: {max_notifications, interval}`. A flush that
would exceed it sends nothing and is retried when the window frees; the group keeps every
alert meanwhile, so whatever changed is folded into that next notification (and
`max_alerts` on the webhook caps its length, the rest counted in `truncatedAlerts`).
Nothing is ever dropped from state by throttling.

Synchronous and clock-driven like the engine: `put(alert)`, `advance(now)` returns the
notifications due, `delivered(n, ok)` records the outcome in the log.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Callable

from .config import Config, InhibitRule, Route
from .labels import all_match, labelset_string
from .nflog import NotificationLog, needs_update
from .signals import Alert, Notification
from .silences import Silences


class Inhibitor:
    """Alertmanager's inhibition: a target alert is muted while a firing source alert of the
    same rule has equal values for the rule's `equal` labels (and is not itself a target
    that also matches as a source)."""

    def __init__(self, rules: list[InhibitRule]):
        self.rules = rules
        # per rule: equal-label values -> {fingerprint: alert}
        self.sources: list[dict[tuple, dict[int, Alert]]] = [{} for _ in rules]
        self._src_fps: dict[int, list[tuple[int, tuple]]] = {}

    def update(self, alert: Alert, now: float) -> None:
        fp = alert.fingerprint
        for ri, key in self._src_fps.pop(fp, ()):
            d = self.sources[ri].get(key)
            if d is not None:
                d.pop(fp, None)
                if not d:
                    del self.sources[ri][key]
        if alert.resolved_by(now):
            return
        entries = []
        for ri, r in enumerate(self.rules):
            if all_match(r.source, alert.labels):
                key = tuple(alert.labels.get(e, "") for e in r.equal)
                self.sources[ri].setdefault(key, {})[fp] = alert
                entries.append((ri, key))
        if entries:
            self._src_fps[fp] = entries

    def inhibited_by(self, alert: Alert, now: float) -> list[int]:
        labels = alert.labels
        for ri, r in enumerate(self.rules):
            if not all_match(r.target, labels):
                continue
            srcs = self.sources[ri].get(tuple(labels.get(e, "") for e in r.equal))
            if not srcs:
                continue
            two_sided = all_match(r.source, labels)
            out = [fp for fp, s in srcs.items()
                   if fp != alert.fingerprint and not s.resolved_by(now)
                   and not (two_sided and all_match(r.target, s.labels))]
            if out:
                return out
        return []

    def muted(self, alert: Alert, now: float) -> bool:
        return bool(self.rules) and bool(self.inhibited_by(alert, now))


class Throttler:
    """At most `max_notifications` per receiver per sliding `interval`."""

    def __init__(self):
        self.sent: dict[str, deque] = {}

    def check(self, receiver: str, throttle, now: float) -> float | None:
        """None if a notification may go now, else the time when one may."""
        if throttle is None:
            return None
        q = self.sent.get(receiver)
        if q is None:
            return None
        while q and q[0] <= now - throttle.interval:
            q.popleft()
        if len(q) < throttle.max_notifications:
            return None
        return q[0] + throttle.interval

    def record(self, receiver: str, throttle, now: float) -> None:
        if throttle is not None:
            self.sent.setdefault(receiver, deque()).append(now)


class Group:
    __slots__ = ("route", "key", "labels", "alerts", "has_flushed", "deadline", "throttled_since")

    def __init__(self, route: Route, key: str, labels: dict[str, str]):
        self.route = route
        self.key = key
        self.labels = labels
        self.alerts: dict[int, Alert] = {}
        self.has_flushed = False
        self.deadline: float | None = None
        self.throttled_since: float | None = None


def _sort_key(a: Alert):
    return (a.ends_at is not None, a.starts_at or 0.0, a.fingerprint)


class Dispatcher:
    def __init__(self, config: Config, clock, *, silences: Silences | None = None,
                 nflog: NotificationLog | None = None, stats: Callable[[str, str], None] | None = None,
                 peer_position: int = 0, peer_timeout: float = 15.0):
        self.clock = clock
        self.silences = silences if silences is not None else Silences()
        self.nflog = nflog if nflog is not None else NotificationLog()
        self.stats = stats or (lambda what, receiver: None)
        self.peer_position = peer_position
        self.peer_timeout = peer_timeout
        self.throttler = Throttler()
        self.inflight: dict[tuple[str, str], tuple[frozenset, frozenset]] = {}
        self._heap: list[tuple[float, int, Group]] = []
        self._seq = itertools.count()
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """A new routing tree: groups are rebuilt from the alerts they hold (as Alertmanager
        does on reload); the notification log keeps dedup right across the change."""
        old = getattr(self, "groups", {})
        self.config = config
        self.inhibitor = Inhibitor(config.inhibit_rules)
        self.integrations: dict[str, list[tuple[str, object]]] = {
            name: [(f"{name}/webhook/{i}", w) for i, w in enumerate(r.webhooks)]
            for name, r in config.receivers.items()}
        self.groups: dict[str, Group] = {}
        self._routes: dict[int, list[Route]] = {}
        self._heap.clear()
        now = self.clock.now()
        for g in old.values():
            for a in g.alerts.values():
                self.put(a, now)

    # -- alerts in -----------------------------------------------------------------
    def put(self, alert: Alert, now: float | None = None) -> None:
        if now is None:
            now = self.clock.now()
        self.inhibitor.update(alert, now)
        fp = alert.fingerprint
        targets = self._routes.get(fp)
        if targets is None:  # routing and group keys depend on the labels only: once per alert
            labels = alert.labels
            targets = []
            for route in self.config.route.match(labels):
                if route.group_by_all:
                    glabels = dict(labels)
                else:
                    glabels = {k: labels[k] for k in route.group_by if k in labels}
                targets.append((route, f"{route.id}:{labelset_string(glabels)}", glabels))
            self._routes[fp] = targets
        for route, gkey, glabels in targets:
            g = self.groups.get(gkey)
            if g is None:
                g = Group(route, gkey, glabels)
                self.groups[gkey] = g
                start = alert.starts_at if alert.starts_at is not None else now
                t = now if start + route.group_wait < now else now + route.group_wait
                self._schedule(g, t)
            g.alerts[fp] = alert

    def _schedule(self, g: Group, t: float) -> None:
        g.deadline = t
        heapq.heappush(self._heap, (t, next(self._seq), g))

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap and (heap[0][2].deadline != heap[0][0] or self.groups.get(heap[0][2].key) is not heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # -- flushing ------------------------------------------------------------------
    def advance(self, now: float | None = None) -> list[Notification]:
        if now is None:
            now = self.clock.now()
        out: list[Notification] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            t, _, g = heapq.heappop(heap)
            if g.deadline != t or self.groups.get(g.key) is not g:
                continue
            g.deadline = None
            self._flush(g, t, out)  # a late timer flushes as of its own time
        return out

    def flush_now(self, now: float | None = None) -> list[Notification]:
        """Flush every group at once (tests; a shutdown)."""
        now = self.clock.now() if now is None else now
        out: list[Notification] = []
        for g in list(self.groups.values()):
            self._flush(g, now, out)
        return out

    def _flush(self, g: Group, now: float, out: list[Notification]) -> None:
        route = g.route
        firing: set[int] = set()
        resolved: set[int] = set()
        visible: list[Alert] = []
        resolved_all: list[Alert] = []
        silences, inhibitor = self.silences, self.inhibitor
        check_mute = bool(silences.silences) or bool(inhibitor.rules)
        for a in g.alerts.values():
            is_resolved = a.resolved_by(now)
            if is_resolved:
                resolved_all.append(a)
            if check_mute:
                if silences.muted(a.labels, now):
                    self.stats("silenced", route.receiver)
                    continue
                if inhibitor.muted(a, now):
                    self.stats("inhibited", route.receiver)
                    continue
            visible.append(a)
            (resolved if is_resolved else firing).add(a.fingerprint)
        firing_f, resolved_f = frozenset(firing), frozenset(resolved)
        receiver = self.config.receivers[route.receiver]
        todo = []
        for ikey, cfg in self.integrations.get(route.receiver, ()):
            if self.inflight.get((g.key, ikey)) == (firing_f, resolved_f):
                continue
            entry = self.nflog.get(g.key, ikey)
            if needs_update(entry, firing_f, resolved_f, route.repeat_interval, cfg.send_resolved, now):
                todo.append((ikey, cfg))
        if todo:
            wait_until = self.throttler.check(receiver.name, receiver.throttle, now)
            if wait_until is not None:
                self.stats("throttled", receiver.name)
                if g.throttled_since is None:
                    g.throttled_since = now
                self._schedule(g, max(wait_until, now + 1e-3))
                return
            g.throttled_since = None
            self.throttler.record(receiver.name, receiver.throttle, now)
            visible.sort(key=_sort_key)
            for ikey, cfg in todo:
                alerts = visible if cfg.send_resolved else [a for a in visible if a.fingerprint in firing_f]
                truncated = 0
                if cfg.max_alerts and len(alerts) > cfg.max_alerts:
                    truncated = len(alerts) - cfg.max_alerts
                    alerts = alerts[:cfg.max_alerts]
                n = Notification(
                    receiver=receiver.name, group_key=g.key, group_labels=g.labels, alerts=list(alerts),
                    firing=firing_f, resolved=resolved_f, created_at=now, integration=ikey, route_id=route.id,
                    truncated=truncated, repeat_interval=route.repeat_interval, send_resolved=cfg.send_resolved,
                    resolved_alerts=tuple(resolved_all),
                    not_before=now + self.peer_position * self.peer_timeout)
                self.inflight[(g.key, ikey)] = (firing_f, resolved_f)
                out.append(n)
        elif resolved_all and not any((g.key, ikey) in self.inflight
                                      for ikey, _ in self.integrations.get(route.receiver, ())):
            # nothing to say: resolved alerts are done with (Alertmanager deletes them after a flush)
            self._drop_resolved(g, resolved_all)
        g.has_flushed = True
        if not g.alerts:
            del self.groups[g.key]
            return
        self._schedule(g, now + route.group_interval)

    def _drop_resolved(self, g: Group, resolved: list[Alert] | tuple[Alert, ...]) -> None:
        for a in resolved:
            if g.alerts.get(a.fingerprint) is a:
                del g.alerts[a.fingerprint]
                self._routes.pop(a.fingerprint, None)

    def still_needed(self, n: Notification, now: float | None = None) -> bool:
        """Whether the log (perhaps updated by a peer meanwhile) still wants `n` sent."""
        now = self.clock.now() if now is None else now
        return needs_update(self.nflog.get(n.group_key, n.integration), n.firing, n.resolved,
                            n.repeat_interval, n.send_resolved, now)

    def delivered(self, n: Notification, ok: bool, now: float | None = None) -> None:
        now = self.clock.now() if now is None else now
        if self.inflight.get((n.group_key, n.integration)) == (n.firing, n.resolved):
            del self.inflight[(n.group_key, n.integration)]
        if not ok:
            return
        self.nflog.log(n.group_key, n.integration, n.firing, n.resolved, now)
        g = self.groups.get(n.group_key)
        if g is not None and n.resolved_alerts:
            self._drop_resolved(g, n.resolved_alerts)
            if not g.alerts:
                del self.groups[g.key]

    def groups_view(self) -> list[dict]:
        return [{"key": g.key, "labels": g.labels, "receiver": g.route.receiver, "alerts": len(g.alerts),
                 "next_flush": g.deadline} for g in self.groups.values()]

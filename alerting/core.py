"""The alerting core on one asyncio loop: rule engine, dispatcher and sinks, with timers on
the clock. This is the seam the `vigil alerting` service is built on:

    core = AlertingCore(rules, config, on_change=publish_to_vigil_alerts, state=restored)
    await core.start()
    core.ingest(signal)            # for every vigil.signals record
    core.snapshot()                # engine instances, notification log, silences: persist it
    core.merge_nflog(entry)        # a peer's notification-log entry (HA pair)
    await core.stop()

Delivery outcomes update the notification log; the alert state machine never waits on a
network. A standby instance (peer_position 1) holds each notification for
peer_position * peer_timeout, then sends only if the log, fed by its peer, does not show
it sent: that is Alertmanager's HA scheme, with the log shared through Kafka instead of
gossip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from eventbus.yamlpos import FileError, FileErrors

from .clock import SystemClock
from .config import Config, load_config
from .dispatch import Dispatcher
from .engine import RuleEngine
from .nflog import Entry, NotificationLog
from .rules import RuleSet, load_rules
from .signals import FIRING, PENDING, RESOLVED, Alert, Notification, Signal, StateChange
from .silences import Silences
from .sinks import AlertmanagerSink, DeliveryQueue, WebhookSender
from .vocabulary import DEFAULT, Vocabulary

log = logging.getLogger("vigil.alerting")


class _StateCollector:
    def __init__(self, core: "AlertingCore"):
        self.core = core

    def collect(self):
        g = GaugeMetricFamily("vigil_alerting_alerts", "Alert instances by state", labels=["state"])
        counts = {PENDING: 0, FIRING: 0, RESOLVED: 0}
        for i in self.core.engine.instances.values():
            if i.state in counts:
                counts[i.state] += 1
        for s, n in counts.items():
            g.add_metric([s], n)
        yield g
        q = GaugeMetricFamily("vigil_alerting_delivery_queue", "Notifications queued per receiver", labels=["receiver"])
        for name, dq in self.core.queues.items():
            q.add_metric([name], len(dq.pending) + len(dq.active))
        yield q
        yield GaugeMetricFamily("vigil_alerting_aggregation_groups", "Aggregation groups",
                                value=len(self.core.dispatcher.groups))
        yield GaugeMetricFamily("vigil_alerting_silences_active", "Active silences",
                                value=len(self.core.silences.list(self.core.clock.now(), ("active",))))


class AlertingCore:
    def __init__(self, rules: RuleSet, config: Config, *, clock=None, state: dict | None = None,
                 on_change: Callable[[StateChange], None] | None = None,
                 on_nflog: Callable[[Entry], None] | None = None,
                 on_silence: Callable[[dict], None] | None = None,
                 peer_position: int = 0, peer_timeout: float = 15.0,
                 registry: CollectorRegistry | None = None, vocabulary: Vocabulary = DEFAULT):
        self.clock = clock or SystemClock()
        self.config = config
        self.vocabulary = vocabulary
        self.user_on_change = on_change
        self.registry = registry or CollectorRegistry()
        self._metrics()
        self.nflog = NotificationLog(on_log=on_nflog)
        self.silences = Silences(on_change=(lambda s: on_silence(Silences.to_dict(s))) if on_silence else None)
        self.engine = RuleEngine(rules, self.clock, on_change=self._on_change, on_alert=self._on_alert,
                                 external_url=config.external_url, external_labels=config.external_labels)
        self.dispatcher = Dispatcher(config, self.clock, silences=self.silences, nflog=self.nflog,
                                     stats=self._stat, peer_position=peer_position, peer_timeout=peer_timeout)
        self.queues: dict[str, DeliveryQueue] = {}
        self.senders: dict[str, WebhookSender] = {}
        self.am_sinks: list[AlertmanagerSink] = []
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._planned = float("inf")
        self.started = False
        self.rule_files: list[str] = list(rules.files)
        self.config_file: str | None = None
        if state:
            self.restore(state)
        self.registry.register(_StateCollector(self))

    # -- metrics -----------------------------------------------------------------------
    def _metrics(self) -> None:
        r = self.registry
        self.m_signals = Counter("vigil_alerting_signals", "Signals taken in", registry=r)
        self.m_changes = Counter("vigil_alerting_state_changes", "Alert state changes", ["state"], registry=r)
        self.m_sent = Counter("vigil_alerting_notifications", "Notifications delivered", ["receiver", "integration"],
                              registry=r)
        self.m_failed = Counter("vigil_alerting_notifications_failed",
                                "Notifications given up on after every retry", ["receiver", "integration"], registry=r)
        self.m_retries = Counter("vigil_alerting_notification_retries", "Delivery retries",
                                 ["receiver", "integration"], registry=r)
        self.m_suppressed = Counter("vigil_alerting_suppressed", "Alerts or notifications held back",
                                    ["reason", "receiver"], registry=r)
        self.m_dropped = Counter("vigil_alerting_queue_replaced",
                                 "Queued notifications replaced by a newer one or pushed out of a full queue",
                                 ["receiver", "reason"], registry=r)
        self.m_latency = Histogram("vigil_alerting_notification_latency_seconds",
                                   "From a group's flush to the receiver's answer", ["receiver"], registry=r,
                                   buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.m_am = Counter("vigil_alerting_alertmanager_alerts", "Alerts posted to Alertmanager", ["url", "result"],
                            registry=r)

    def metric(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def _stat(self, what: str, receiver: str) -> None:
        self.m_suppressed.labels(what, receiver).inc()

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, spawn: Callable[[str, Callable], asyncio.Task] | None = None) -> None:
        """`spawn(name, factory)` starts the timer loop (the service passes its supervisor's
        start); by default it runs as a plain task."""
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        self._build_sinks()
        self.started = True
        self._task = (spawn or (lambda name, factory: asyncio.create_task(factory(), name=name)))(
            "alerting-timers", self._timer_loop)

    def _build_sinks(self) -> None:
        session = lambda: self._session  # noqa: E731
        for name, recv in self.config.receivers.items():
            for i, w in enumerate(recv.webhooks):
                ikey = f"{name}/webhook/{i}"
                self.senders[ikey] = WebhookSender(
                    w, session, self.config.external_url, self.clock,
                    on_retry=lambda attempt, err, n=name, k=ikey: self.m_retries.labels(n, k).inc())
            if name not in self.queues and recv.webhooks:
                self.queues[name] = DeliveryQueue(name, self._deliver, recv.max_concurrency, recv.queue_size,
                                                  on_drop=self._dropped)
        if self.am_sinks:
            return  # the alertmanagers list is read at start only
        for t in self.config.alertmanagers:
            self.am_sinks.append(AlertmanagerSink(
                t, session, self.clock, self.engine.firing_alerts,
                on_result=lambda ok, n, err, url=t.url: self._am_result(url, ok, n, err)))

    async def stop(self) -> None:
        self.started = False
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for q in self.queues.values():
            await q.close()
        for s in self.am_sinks:
            await s.close()
        self.queues.clear()
        self.am_sinks.clear()
        if self._session:
            await self._session.close()

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued notification and alert post is done (tests, shutdown)."""
        async def all_idle():
            while True:
                await asyncio.sleep(0)
                waits = [q.idle.wait() for q in self.queues.values() if not q.idle.is_set()]
                waits += [s.idle.wait() for s in self.am_sinks if not s.idle.is_set()]
                if not waits:
                    return
                await asyncio.gather(*waits)
        await asyncio.wait_for(all_idle(), timeout)

    # -- input ---------------------------------------------------------------------------
    def ingest(self, sig: Signal) -> None:
        self.m_signals.inc()
        self.engine.ingest(sig)
        self._maybe_wake()

    def ingest_many(self, sigs) -> None:
        n = 0
        ingest = self.engine.ingest
        now = self.clock.now()
        for s in sigs:
            ingest(s, now)
            n += 1
        self.m_signals.inc(n)
        self._maybe_wake()

    def _maybe_wake(self) -> None:
        if self._wake is None:
            return
        t = min((d for d in (self.engine.next_deadline(), self.dispatcher.next_deadline()) if d is not None),
                default=float("inf"))
        if t < self._planned:
            self._wake.set()

    def _on_change(self, c: StateChange) -> None:
        self.m_changes.labels(c.state).inc()
        if self.user_on_change is not None:
            try:
                self.user_on_change(c)
            except Exception:
                log.exception("on_change hook failed")

    def _on_alert(self, a: Alert) -> None:
        self.dispatcher.put(a)
        for s in self.am_sinks:
            s.put(a)

    # -- timers --------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[Notification]:
        """Run every due timer and hand the notifications due to the delivery queues."""
        now = self.clock.now() if now is None else now
        notes: list[Notification] = []
        inf = float("inf")
        while True:  # both timer heaps, in time order, each timer at its own time
            te = self.engine.next_deadline()
            td = self.dispatcher.next_deadline()
            te = inf if te is None else te
            td = inf if td is None else td
            if min(te, td) > now:
                break
            if te <= td:
                self.engine.advance(te)
            else:
                notes.extend(self.dispatcher.advance(td))
        for n in notes:
            self._enqueue(n)
        return notes

    def _enqueue(self, n: Notification) -> None:
        q = self.queues.get(n.receiver)
        if q is None:
            self.dispatcher.delivered(n, False)
            return
        q.put(n)

    def next_deadline(self) -> float | None:
        ts = [t for t in (self.engine.next_deadline(), self.dispatcher.next_deadline()) if t is not None]
        return min(ts) if ts else None

    async def _timer_loop(self) -> None:
        last_gc = time.monotonic()
        while True:
            self._wake.clear()
            try:
                self.tick()
            except Exception:
                log.exception("alerting timer step failed")
            if time.monotonic() - last_gc > 60:
                now = self.clock.now()
                self.nflog.gc(now)
                self.silences.gc(now)
                last_gc = time.monotonic()
            t = self.next_deadline()
            sc = self.silences.next_change(self.clock.now())
            if sc is not None and (t is None or sc < t):
                t = sc
            self._planned = t if t is not None else float("inf")
            sleeper = asyncio.ensure_future(self.clock.sleep_until(t if t is not None else self.clock.now() + 60))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    # -- delivery ------------------------------------------------------------------------
    async def _deliver(self, n: Notification) -> bool:
        if n.not_before > self.clock.now():
            await self.clock.sleep_until(n.not_before)
            if not self.dispatcher.still_needed(n):
                self.dispatcher.delivered(n, False)
                self.m_suppressed.labels("sent_by_peer", n.receiver).inc()
                return True
        sender = self.senders[n.integration]
        t0 = time.perf_counter()
        out = await sender.send(n)
        self.m_latency.labels(n.receiver).observe(time.perf_counter() - t0)
        if out.ok:
            self.m_sent.labels(n.receiver, n.integration).inc()
        else:
            self.m_failed.labels(n.receiver, n.integration).inc()
            log.warning("notification to %s failed after %d attempts: %s", n.integration, out.attempts, out.error)
        self.dispatcher.delivered(n, out.ok)
        return out.ok

    def _dropped(self, n: Notification, why: str) -> None:
        self.m_dropped.labels(n.receiver, why).inc()
        self.dispatcher.delivered(n, False)

    def _am_result(self, url: str, ok: bool, n: int, err: str) -> None:
        self.m_am.labels(url, "ok" if ok else "failed").inc(n)
        if not ok:
            log.warning("posting %d alerts to %s failed: %s", n, url, err)

    # -- HA and persistence ----------------------------------------------------------------
    def merge_nflog(self, entry: Entry | dict) -> None:
        self.nflog.merge(entry)

    def merge_silence(self, d: dict) -> None:
        self.silences.merge(d)
        self.wake()

    def wake(self) -> None:
        """Have the timer loop look again (a silence or an alert changed outside it)."""
        if self._wake is not None:
            self._wake.set()

    def snapshot(self) -> dict:
        return {"version": 1, "taken_at": self.clock.now(), "engine": self.engine.snapshot(),
                "nflog": self.nflog.snapshot(), "silences": self.silences.snapshot()}

    def restore(self, state: dict) -> None:
        """Before start: alerts, timers, the log and silences as a snapshot left them. Alerts
        that were firing or resolved go back into their groups; the log keeps a group that
        was notified from being notified again."""
        self.nflog.restore(state.get("nflog", []))
        self.silences.restore(state.get("silences", []))
        self.engine.restore(state.get("engine", {}))
        now = self.clock.now()
        for inst in self.engine.instances.values():
            if inst.state in (FIRING, RESOLVED):
                self.dispatcher.put(self.engine.alert_of(inst, now), now)

    # -- reload --------------------------------------------------------------------------
    def reload(self, rule_files: list[str] | None = None, config_file: str | None = None) -> list[FileError]:
        """Reload rules and configuration from files; on any error keep the last good ones
        and return the errors (SIGHUP and POST /-/reload call this)."""
        rule_files = rule_files if rule_files is not None else self.rule_files
        config_file = config_file if config_file is not None else self.config_file
        try:
            rules = load_rules(rule_files, self.vocabulary)
            config = load_config(config_file) if config_file else self.config
        except FileErrors as e:
            log.error("reload failed, keeping the last good rules and configuration:\n%s", e)
            return e.errors
        self.engine.replace_rules(rules)
        if config is not self.config:
            self.config = config
            self.dispatcher.set_config(config)
            if self.started:
                self._build_sinks()
        self.rule_files, self.config_file = list(rule_files), config_file
        self.wake()
        log.info("reloaded %d rules from %s", len(rules), ", ".join(map(str, rule_files)))
        return []


def reload_on_sighup(core: AlertingCore) -> None:
    """SIGHUP reloads rules and configuration (the last good ones stay on error)."""
    import signal
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, core.reload)


def core_from_files(rule_files: list[str | Path], config_file: str | Path, **kw) -> AlertingCore:
    """Refuses (FileErrors) to build a core from invalid rules or configuration."""
    vocab = kw.get("vocabulary", DEFAULT)
    rules = load_rules(rule_files, vocab)
    config = load_config(config_file)
    core = AlertingCore(rules, config, **kw)
    core.config_file = str(config_file)
    return core

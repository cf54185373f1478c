"""`vigil alerting`: the alerting core on Kafka. The one module of alerting/ that knows
Kafka and protobuf (through eventbus/ and protos/); the rest of the package stays pure.

    vigil.signals ──► Signal proto ─► alerting.Signal ─► AlertingCore ─► webhooks, Alertmanager
                                                            │
    vigil.alerts ◄── Alert proto (key: fingerprint) ◄───────┤ every state change
                                                            │
    vigil.alerting.state (compacted, JSON values) ◄────────►┘
        snapshot/<instance>          alerts, pending timers, the signal offsets read
        nflog/<group key>/<receiver> the notification log, shared by every instance
        silence/<id>                 silences, shared by every instance

Signals are read from every partition without a consumer group, so each instance of an
HA pair sees every signal. At start an instance reads vigil.alerting.state to its end,
restores its own latest snapshot, merges every nflog entry and silence, and resumes
vigil.signals at the offsets the snapshot recorded (from the end where there is none):
signals after the snapshot are read again, and the log keeps what was already sent from
being sent again. While running it keeps reading the state topic, so a peer's log
entries and silences arrive within a poll; the standby (peer position 1) holds each
notification for peer_timeout and sends it only if the log does not show it sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from eventbus import cloudevents, codec, compat, service, topics
from eventbus.kafka import Kafka
from eventbus.security import KafkaSecurity
from eventbus.state import read_compacted, seek_to_end, stop_consumer
from eventbus.supervise import Supervisor
from eventbus.yamlpos import FileError
from protos import events_pb2

from .admin import AdminServer
from .config import load_config
from .core import AlertingCore
from .nflog import Entry
from .rules import load_rules
from .signals import FIRING, INACTIVE, PENDING, RESOLVED, Signal, StateChange
from .vocabulary import DEFAULT

log = logging.getLogger("vigil.alerting.service")
compat.install()

STATES = {INACTIVE: events_pb2.ALERT_STATE_INACTIVE, PENDING: events_pb2.ALERT_STATE_PENDING,
          FIRING: events_pb2.ALERT_STATE_FIRING, RESOLVED: events_pb2.ALERT_STATE_RESOLVED}
KINDS = {v.number: v.name.removeprefix("SIGNAL_KIND_").lower()
         for v in events_pb2.SignalKind.DESCRIPTOR.values if v.number}


@dataclass
class ServiceOptions:
    bootstrap_servers: str
    rule_files: list[str]
    config_file: str
    admin_host: str = "127.0.0.1"
    admin_port: int = 9095          # 0: any free port
    instance: str = ""              # key of this instance's snapshot; default alerting-<peer_position>
    peer_position: int = 0
    peer_timeout: float = 15.0
    webhook_secret_file: str = ""   # HMAC secret of webhooks whose configuration names none
    snapshot_interval: float = 5.0
    topic_partitions: int = 6
    source: str = field(default_factory=lambda: f"vigil-alerting@{socket.gethostname()}")
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS (repr hides passwords)

    def __post_init__(self):
        if not self.instance:
            self.instance = f"alerting-{self.peer_position}"


def _ts(t) -> float | None:
    return t.seconds + t.nanos / 1e9 if (t.seconds or t.nanos) else None


def signal_from_proto(m: events_pb2.Signal) -> Signal:
    return Signal(
        detector=m.detector, feature=m.feature, model=m.model, version=m.version, statistic=m.statistic,
        drifted=m.drifted, time=_ts(m.time) or time.time(),
        threshold=m.threshold if m.HasField("threshold") else None,
        p_value=m.p_value if m.HasField("p_value") else None,
        reference_size=m.reference_size, window_size=m.window_size, kind=KINDS.get(m.kind, ""),
        window_start=_ts(m.window_start), window_end=_ts(m.window_end),
        labels=dict(m.labels) or None, event_id=m.event_id, source=m.source)


def alert_to_proto(c: StateChange, source: str, generator_url: str = "") -> events_pb2.Alert:
    a = events_pb2.Alert(
        event_id=str(uuid.uuid4()), source=source, fingerprint=c.fingerprint, rule=c.rule,
        state=STATES.get(c.state, 0), previous_state=STATES.get(c.previous, 0),
        severity=c.labels.get("severity", ""), labels=c.labels, annotations=c.annotations,
        value=c.value if isinstance(c.value, float | int) else float("nan"), generator_url=generator_url)
    a.time.FromNanoseconds(int(c.at * 1e9))
    start = c.starts_at if c.starts_at is not None else c.active_at
    if start is not None:
        a.starts_at.FromNanoseconds(int(start * 1e9))
    if c.ends_at is not None:
        a.ends_at.FromNanoseconds(int(c.ends_at * 1e9))
    return a


def read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"webhook secret file {path} is empty")
    return secret


class AlertingService:
    def __init__(self, options: ServiceOptions):
        self.options = options
        self.kafka = Kafka(options.bootstrap_servers, options.security)
        self.core: AlertingCore | None = None
        self.admin: AdminServer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.out: asyncio.Queue = asyncio.Queue()
        self.tasks: Supervisor | None = None  # on the core's registry, made at start
        self.consumers: list[AIOKafkaConsumer] = []
        self.signal_offsets: dict[int, int] = {}  # next offset to read, per vigil.signals partition
        self.snapshot_due = asyncio.Event()
        self.secret = read_secret(options.webhook_secret_file) if options.webhook_secret_file else None
        self.restored = False
        self.stopping = False
        self.merged_from_peers = 0

    # -- start and stop --------------------------------------------------------------------
    async def start(self) -> None:
        o = self.options
        # refuse to start on invalid rules or configuration (FileErrors names file, line, field)
        rules = load_rules(o.rule_files, DEFAULT)
        config = load_config(o.config_file)
        await self.kafka.ensure_topics(f"{o.instance}-admin", (topics.SIGNALS, topics.ALERTS, topics.ALERTING_STATE),
                                       topics.TopicOptions(partitions=o.topic_partitions))
        state_consumer = self.kafka.consumer(f"{o.instance}-state")
        self.consumers.append(state_consumer)
        await state_consumer.start()
        snapshot, nflog, silences = await self._read_state(state_consumer)
        self.core = AlertingCore(rules, config, state=snapshot.get("core") if snapshot else None,
                                 on_change=self._on_change, on_nflog=self._on_nflog,
                                 on_silence=self._on_silence, peer_position=o.peer_position,
                                 peer_timeout=o.peer_timeout)
        self.core.config_file = o.config_file
        self.tasks = Supervisor(self.core.registry)
        self.restored = snapshot is not None
        for d in nflog:
            self.core.merge_nflog(d)
        for d in silences:
            self.core.merge_silence(d)
        self._apply_secret()
        core_reload = self.core.reload

        def reload(*a, **kw):  # SIGHUP and POST /-/reload: then the secret for webhooks without one
            errors = core_reload(*a, **kw)
            self._apply_secret()
            return errors
        self.core.reload = reload
        self.signal_offsets = {int(p): int(off) for p, off in (snapshot or {}).get("signals", {}).items()}
        self.producer = self.kafka.producer(o.instance, acks="all", linger_ms=2)
        await self.producer.start()
        await self.core.start(self.tasks.start)
        self.admin = AdminServer(self.core, o.admin_host, o.admin_port, down=self.tasks.down)
        await self.admin.start()
        signals_consumer = self.kafka.consumer(f"{o.instance}-signals")
        self.consumers.append(signals_consumer)
        await signals_consumer.start()
        await self._assign_signals(signals_consumer)
        self.tasks.start("alerting-send", self._send_loop)
        self.tasks.start("alerting-state", lambda: self._state_loop(state_consumer))
        self.tasks.start("alerting-signals", lambda: self._signals_loop(signals_consumer))
        self.tasks.start("alerting-snapshot", self._snapshot_loop)
        log.info("vigil alerting %s (peer position %d): %d rules, %s; admin on %s",
                 o.instance, o.peer_position, len(rules), "state restored" if self.restored else "fresh state",
                 self.admin.url)

    async def stop(self) -> None:
        self.stopping = True
        self.snapshot_due.set()
        if self.tasks is not None:  # readers first, then what they produced
            await self.tasks.stop("alerting-state", "alerting-signals", "alerting-snapshot")
        for c in self.consumers:
            await stop_consumer(c)
        self.consumers = []
        if self.core is not None:
            await self.core.drain(timeout=5.0)
            self._persist_snapshot()
            await self.core.stop()
        if self.tasks is not None:
            await self._flush_out()
            await self.tasks.stop()
        if self.admin is not None:
            await self.admin.stop()
        if self.producer is not None:
            await self.producer.stop()

    async def _flush_out(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (not self.out.empty() or self._sending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- the state topic -------------------------------------------------------------------
    async def _read_state(self, consumer: AIOKafkaConsumer):
        """Read vigil.alerting.state to its end: this instance's latest snapshot, and the
        latest nflog entry and silence per key (of every instance). The consumer stays
        at the end, to follow the peers' records."""
        latest: dict[str, dict] = {}

        def keep(r):
            key = r.key.decode() if r.key else ""
            if r.value is None:
                latest.pop(key, None)  # a tombstone
                return
            try:
                latest[key] = json.loads(r.value)
            except ValueError:
                log.warning("undecodable state record %s at %s:%d@%d", key, r.topic, r.partition, r.offset)
        await read_compacted(self.kafka, consumer, topics.ALERTING_STATE, keep, wait_for_topic=15.0)
        snapshot = latest.get(f"snapshot/{self.options.instance}")
        nflog = [v for k, v in latest.items() if k.startswith("nflog/")]
        silences = [v for k, v in latest.items() if k.startswith("silence/")]
        log.info("state read: %s, %d log entries, %d silences",
                 "a snapshot" if snapshot else "no snapshot", len(nflog), len(silences))
        return snapshot, nflog, silences

    async def _state_loop(self, consumer: AIOKafkaConsumer) -> None:
        """Peers' log entries and silences, as they come."""
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    self._merge_state(r)

    def _merge_state(self, r) -> None:
        if r.value is None or r.key is None:
            return
        origin = dict(r.headers or ()).get("vigil_instance", b"").decode()
        if origin == self.options.instance:
            return
        key = r.key.decode()
        try:
            if key.startswith("nflog/"):
                self.core.merge_nflog(json.loads(r.value))
                self.merged_from_peers += 1
            elif key.startswith("silence/"):
                self.core.merge_silence(json.loads(r.value))
                self.merged_from_peers += 1
        except (ValueError, KeyError, TypeError):
            log.warning("could not merge state record %s", key, exc_info=True)

    def _put_state(self, key: str, value: dict) -> None:
        self.out.put_nowait((topics.ALERTING_STATE, key, json.dumps(value, separators=(",", ":")).encode(),
                             [("content-type", b"application/json"),
                              ("vigil_instance", self.options.instance.encode())]))

    def _on_nflog(self, e: Entry) -> None:
        self._put_state(f"nflog/{e.group_key}/{e.receiver}", e.to_dict())
        self.snapshot_due.set()

    def _on_silence(self, d: dict) -> None:
        self._put_state(f"silence/{d['id']}", d)

    def _persist_snapshot(self) -> None:
        if self.core is None:
            return
        self._put_state(f"snapshot/{self.options.instance}",
                        {"core": self.core.snapshot(), "signals": {str(p): o for p, o in self.signal_offsets.items()},
                         "instance": self.options.instance, "at": time.time()})

    async def _snapshot_loop(self) -> None:
        """A snapshot soon after a state change or a notification, and every snapshot_interval."""
        while not self.stopping:  # (3.11's wait_for can swallow a cancel: the flag ends the loop)
            try:
                await asyncio.wait_for(self.snapshot_due.wait(), self.options.snapshot_interval)
                await asyncio.sleep(0.2)  # one snapshot for a burst of changes
            except asyncio.TimeoutError:
                pass
            self.snapshot_due.clear()
            self._persist_snapshot()

    # -- vigil.alerts ----------------------------------------------------------------------
    def _on_change(self, c: StateChange) -> None:
        ext = self.core.config.external_url if self.core else ""
        a = alert_to_proto(c, self.options.source, ext)
        headers = cloudevents.headers(a.event_id, a.DESCRIPTOR.full_name, self.options.source, c.at, codec.PROTOBUF)
        self.out.put_nowait((topics.ALERTS, c.fingerprint, codec.encode(a), headers))
        self.snapshot_due.set()

    _sending = False

    async def _send_loop(self) -> None:
        """Every record this service writes, in the order it was made."""
        while True:
            topic, key, value, headers = await self.out.get()
            self._sending = True
            try:
                for attempt in range(1000):
                    try:
                        await self.producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # the broker is away: keep the order, try again
                        if attempt % 20 == 0:
                            log.warning("writing to %s failed, retrying: %s", topic, exc)
                        await asyncio.sleep(min(0.1 * 2 ** min(attempt, 5), 2.0))
            finally:
                self._sending = False

    # -- vigil.signals ---------------------------------------------------------------------
    async def _assign_signals(self, consumer: AIOKafkaConsumer) -> None:
        tps = await self.kafka.partitions(consumer, topics.SIGNALS, 15.0)
        consumer.assign(tps)
        ends = await seek_to_end(consumer, tps)
        for tp in tps:
            if tp.partition not in self.signal_offsets:  # a fresh instance starts at the end: old signals are history
                self.signal_offsets[tp.partition] = ends[tp]

    async def _signals_loop(self, consumer: AIOKafkaConsumer) -> None:
        """From the offsets taken in so far: a restart after a failure reads its batch again."""
        for tp in consumer.assignment():
            consumer.seek(tp, self.signal_offsets[tp.partition])
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                sigs = []
                for r in records:
                    try:
                        msg = codec.decode(r.value, cloudevents.attributes(r.headers), r.topic)
                        if isinstance(msg, events_pb2.Signal):
                            sigs.append(signal_from_proto(msg))
                    except codec.Undecodable as exc:
                        log.warning("skipping undecodable signal %s@%d: %s", tp, r.offset, exc)
                if sigs:
                    self.core.ingest_many(sigs)
                if records:
                    self.signal_offsets[tp.partition] = records[-1].offset + 1

    # -- reload ------------------------------------------------------------------------------
    def reload(self) -> list[FileError]:
        """Rules and configuration from their files again; on error the last good ones stay."""
        return self.core.reload()

    def _apply_secret(self) -> None:
        if self.secret is None:
            return
        for recv in self.core.config.receivers.values():
            for w in recv.webhooks:
                if w.hmac_secret is None:
                    w.hmac_secret = self.secret


async def serve(options: ServiceOptions, ready=None) -> None:
    """Run until SIGINT or SIGTERM; SIGHUP reloads rules and configuration."""
    s = AlertingService(options)
    await service.serve(s, "vigil alerting", lambda s: (
        f"vigil alerting: {options.instance} (peer position {options.peer_position}), "
        f"{len(s.core.engine.rules.rules)} rules, signals from {options.bootstrap_servers}, "
        f"admin and metrics on {s.admin.url}"), ready=ready, reload=lambda: s.core and s.reload())


__all__ = ["AlertingService", "ServiceOptions", "alert_to_proto", "serve", "signal_from_proto"]

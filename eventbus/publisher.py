"""Publishing events without ever making a request wait for Kafka, and without losing
one that was published, whenever the process dies.

`publish` encodes the event and appends it to the on-disk outbox, a write-ahead log,
with one write(2), then returns: called on the publisher's loop (as the server does,
before it answers the request), the event is in the kernel's page cache when it
returns, so a killed process (SIGKILL, OOM, a crash) loses nothing it published. The
outbox's fsync schedule decides what a power loss may take (see eventbus/outbox.py).
One task, the pump, sends records to an aiokafka producer (idempotent, acks=all,
batched, compressed), in the order they were published, and moves the outbox's cursor
past each batch once the broker acknowledges it:

- while the broker keeps up, from a bounded copy in memory (`queue_size` records), so
  the outbox is only written, never read;
- otherwise (the broker down or slow, the copy full, or records left from an earlier
  run) from the outbox itself, until it has sent everything there, then from memory
  again.

A batch the broker has not acknowledged within publish_timeout_ms, or a lost connection
to a broker that then answers no metadata request, makes the broker count as down: the
producer is thrown away and a new one (with a new producer id, which a restarted broker
also accepts) sends the outbox once the broker answers again. So a record reaches Kafka
at least once, in order per key; it comes twice (with the same ce_id) when the broker
took it but its acknowledgement, or the cursor's move past it, was lost to a broken
connection or a crash. It is lost, and counted as failed, only when the outbox cannot
take it (at its size limit, or the disk fails) and the broker does not have it before
the process ends; or when it is published after stop().

Reading, committing and syncing the outbox run in a thread of the publisher's own.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.conn import CloseReason
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError
from google.protobuf import json_format
from google.protobuf.message import Message

from eventbus import cloudevents, codec, compat, topics
from eventbus.kafka import Kafka
from eventbus.metrics import PublisherMetrics
from eventbus.outbox import Outbox, OutboxFull, Position, Record
from eventbus.security import KafkaSecurity
from eventbus.supervise import Supervisor

log = logging.getLogger(__name__)
compat.install()

REJECTED = (MessageSizeTooLargeError, RecordTooLargeError, RecordListTooLargeError)  # no retry can help


@dataclass(frozen=True)
class PublisherOptions:
    bootstrap_servers: str
    outbox_dir: str
    content_type: str = codec.PROTOBUF
    source: str = "vigil"          # ce_source of events that do not name their own
    client_id: str = "vigil"
    queue_size: int = 10_000       # records kept in memory for sending; beyond, they are sent from the outbox
    batch_records: int = 500       # records sent (or spilled) in one step
    publish_timeout_ms: int = 5_000  # unacknowledged this long: the broker counts as down
    linger_ms: int = 5
    compression: str | None = "gzip"
    max_request_bytes: int = 8 << 20
    outbox_fsync_ms: int = 1_000
    outbox_segment_bytes: int = 64 << 20
    outbox_max_bytes: int = 1 << 30
    reconnect_backoff_max_ms: int = 2_000
    topic_names: tuple[str, ...] = topics.ALL  # created at connection if missing
    topic_options: topics.TopicOptions = field(default_factory=topics.TopicOptions)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS (repr hides passwords)


class Publisher:
    def __init__(self, options: PublisherOptions, metrics: PublisherMetrics | None = None,
                 to_message: Callable[[str, dict], Message] | None = None, tasks: Supervisor | None = None):
        """to_message turns a dict given to publish() into the topic's message; by
        default the dict is read as the message's JSON mapping."""
        self.options = options
        self.metrics = metrics if metrics is not None else PublisherMetrics()
        self.to_message = to_message or parse_dict
        # while caught_up, every record from the outbox's cursor on, with its place in the
        # outbox (None: the outbox could not take it), in order
        self.hot: collections.deque[tuple[Record, tuple[Position, Position] | None]] = collections.deque()
        self.caught_up = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread = 0
        self.wakeup: asyncio.Event | None = None
        self.producer: AIOKafkaProducer | None = None
        self.outbox: Outbox | None = None
        self.io = ThreadPoolExecutor(1, thread_name_prefix="vigil-outbox")
        # the pump and the outbox's fsync run supervised (the owner's supervisor, so that its
        # health says when one is down), or under one of the publisher's own
        self.supervisor = tasks if tasks is not None else Supervisor(self.metrics.registry)
        self.tasks: list[asyncio.Task] = []
        self.closing = False
        self.in_flight = 0
        self.replay_acked: set[Position] = set()  # starts of records past the cursor already acknowledged
        self.broker_lost: asyncio.Event | None = None  # the producer's connection broke and no broker answers
        self.probing: asyncio.Task | None = None
        self.next_connect = 0.0
        self.backoff = 0.1
        self.down_since: float | None = None
        self.last_complaint = 0.0

    # -- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Opens the outbox (OSError if another process holds it) and starts the pump;
        the broker need not be up."""
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.wakeup = asyncio.Event()
        o = self.options
        self.outbox = Outbox(o.outbox_dir, segment_bytes=o.outbox_segment_bytes, max_bytes=o.outbox_max_bytes,
                             fsync_ms=o.outbox_fsync_ms, on_corrupt=lambda *_: self.metrics.corrupt.inc())
        await self.disk(self.outbox.open)
        if pending := self.outbox.pending_bytes:
            log.info("outbox %s holds %d bytes from an earlier run; replaying them first", o.outbox_dir, pending)
        self.metrics.queued.set_function(lambda: len(self.hot))
        self.metrics.outbox_bytes.set_function(lambda: self.outbox.pending_bytes)
        self.metrics.connected.set(0)
        if not await self.connect(timeout=min(2.0, o.publish_timeout_ms / 1000)):
            self.next_connect = time.monotonic() + self.backoff
        self.caught_up = self.producer is not None and not pending
        self.tasks.append(self.supervisor.start("vigil-publisher", self.pump))
        if o.outbox_fsync_ms > 0:
            self.tasks.append(self.supervisor.start("vigil-publisher-fsync",
                                                    lambda: self.sync_outbox(o.outbox_fsync_ms / 1000)))

    async def stop(self) -> None:
        """Sends what the broker takes within one publish timeout; the rest stays in the
        outbox for the next start."""
        if not self.tasks:
            return
        self.closing = True
        self.wakeup.set()
        await self.tasks[0]
        for task in [*self.tasks[1:], self.probing]:
            if task is not None:
                task.cancel()
        if self.producer is not None:
            await self.drop_producer("closing")
        await self.disk(self.outbox.close)
        self.io.shutdown(wait=True)
        self.tasks.clear()

    async def flush(self, timeout: float = 30.0) -> bool:
        """Waits until everything published so far is acknowledged; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.hot or self.in_flight or self.outbox.pending_bytes:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    @property
    def connected(self) -> bool:
        return self.producer is not None

    # -- the request path ------------------------------------------------------------------

    def publish(self, topic: str, key: str, event: Message | dict,
                on_done: Callable[[str], None] | None = None) -> None:
        """Write an event to the outbox and hand it to the pump; never waits for the
        broker, nor for the disk unless the outbox fsyncs every write. On the publisher's
        loop the event is in the outbox when this returns; from another thread, once the
        loop has run the call this one schedules there. A message's empty event_id,
        source and time are filled in here. `on_done`, if given, is called once on the
        publisher's loop: with "" when the broker acknowledges the event, "outbox" when
        it waits in the outbox for the broker instead, or the reason it was lost."""
        if threading.get_ident() != self.loop_thread:
            self.loop.call_soon_threadsafe(self.publish, topic, key, event, on_done)
            return
        if self.closing:
            self.lost(topic, "closed", 1)
            settle(on_done, "closed")
            return
        try:
            record = self.encode(topic, key, event, time.time())
        except Exception:
            log.exception("cannot encode an event for %s; dropped", topic)
            self.lost(topic, "encode", 1)
            settle(on_done, "encode")
            return
        record.done = on_done
        keep = self.caught_up and len(self.hot) < self.options.queue_size
        try:
            place = self.outbox.append([record])
        except OSError as exc:
            if not keep:
                self.lost_all([record], "outbox_full" if isinstance(exc, OutboxFull) else "outbox_write", exc)
                return
            self.complain(f"outbox {self.options.outbox_dir}: {exc}; sending from memory only")
            self.metrics.unlogged.labels(topic).inc()
            place = None
        if keep:
            self.hot.append((record, place))
            self.wakeup.set()
        else:
            self.caught_up = False
            self.wait_in_outbox([(record, place)])
            self.wakeup.set()

    # -- the pump --------------------------------------------------------------------------

    async def pump(self) -> None:
        while not await self.step():
            pass

    async def step(self) -> bool:
        """One move of records; True once closing has nothing left to do."""
        if self.producer is not None and self.broker_lost.is_set():
            await self.drop_producer("connection lost, and no broker answers a metadata request")
        if self.hot and self.producer is not None:
            await self.send_hot()
            return False
        if self.caught_up or self.closing:
            if self.closing:
                return True
            await self.wait(None)
            return False
        if self.producer is None:
            now = time.monotonic()
            if now < self.next_connect:
                await self.wait(self.next_connect - now)
                return False
            if not await self.connect():
                self.next_connect = time.monotonic() + self.backoff
                self.backoff = min(self.backoff * 2, self.options.reconnect_backoff_max_ms / 1000)
                return False
        await self.replay()
        if self.producer is not None and not self.outbox.pending_bytes:
            self.caught_up = True  # publish() runs on this loop too: nothing slips in between
            log.info("outbox replayed; publishing from memory again")
        return False

    async def wait(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self.wakeup.wait(), timeout)
        except TimeoutError:
            pass
        self.wakeup.clear()

    async def send_hot(self) -> None:
        """Send the oldest records kept in memory and move the cursor past those
        acknowledged in a row; if some are not, the rest wait in the outbox."""
        batch = [self.hot.popleft() for _ in range(min(len(self.hot), self.options.batch_records))]
        unsent = {id(r) for r in await self.send([r for r, _ in batch])}
        end, in_row = None, True
        for r, place in batch:
            if id(r) in unsent:
                in_row = False
            elif place is not None:
                if in_row:
                    end = place[1]
                else:
                    self.replay_acked.add(place[0])
        if end is not None:
            await self.commit(end)
        self.wait_in_outbox([(r, place) for r, place in batch if id(r) in unsent])

    def encode(self, topic: str, key: str, event: Message | dict, published: float) -> Record:
        message = event if isinstance(event, Message) else self.to_message(topic, event)
        fields = message.DESCRIPTOR.fields_by_name
        event_id = getattr(message, "event_id", "") or str(uuid.uuid4())
        source = getattr(message, "source", "") or self.options.source
        if "event_id" in fields:
            message.event_id = event_id
        if "source" in fields:
            message.source = source
        when = published
        if "time" in fields:
            if message.HasField("time"):
                when = message.time.ToNanoseconds() / 1e9
            else:
                message.time.FromNanoseconds(int(published * 1e9))
        ct = self.options.content_type
        headers = cloudevents.headers(event_id, message.DESCRIPTOR.full_name, source, when, ct)
        return Record(topic, key.encode() if key is not None else None, codec.encode(message, ct),
                      headers, int(published * 1000))

    async def send(self, records: list[Record]) -> list[Record]:
        """Sends records and waits for their acknowledgements; returns those not
        acknowledged (in order), having given up the producer if there are any."""
        producer, lost, futures = self.producer, self.broker_lost, []
        problem = None
        self.in_flight += len(records)
        try:
            async with asyncio.timeout(self.options.publish_timeout_ms / 1000):
                for r in records:
                    try:
                        futures.append(await producer.send(r.topic, r.value, key=r.key, headers=r.headers,
                                                           timestamp_ms=r.timestamp_ms))
                    except REJECTED as exc:
                        futures.append(exc)
                pending = [f for f in futures if isinstance(f, asyncio.Future)]
                if pending:
                    await acknowledged(pending, lost)
        except Exception as exc:  # whatever the producer raises, the records must not be lost
            problem = exc if not isinstance(exc, TimeoutError) else \
                f"no acknowledgement within {self.options.publish_timeout_ms} ms"
        finally:
            self.in_flight -= len(records)
        if lost.is_set():
            problem = problem or "connection lost, and no broker answers a metadata request"
        unsent, now = [], time.time()
        for i, r in enumerate(records):
            f = futures[i] if i < len(futures) else None
            if f is None or (isinstance(f, asyncio.Future) and (not f.done() or f.cancelled())):
                unsent.append(r)
                continue
            exc = f if isinstance(f, BaseException) else f.exception()
            if exc is None:
                self.metrics.published.labels(r.topic).inc()
                self.metrics.latency.labels(r.topic).observe(max(0.0, now - r.timestamp_ms / 1000))
                settle(r.done, "")
                r.done = None
            elif isinstance(exc, REJECTED):
                log.error("broker refused an event for %s (%d bytes): %s", r.topic, len(r.value), exc)
                self.lost(r.topic, "rejected", 1)
                settle(r.done, "rejected")
                r.done = None
            else:
                problem = problem or exc
                unsent.append(r)
        if unsent:
            await self.drop_producer(problem or "unacknowledged records")
        return unsent

    def wait_in_outbox(self, records: list[tuple[Record, tuple[Position, Position] | None]]) -> None:
        """These records are not sent from memory: those in the outbox wait there for
        the broker; one the outbox could not take is lost."""
        for r, place in records:
            if place is None:
                self.lost(r.topic, "outbox_write", 1)
                settle(r.done, "outbox_write")
            else:
                self.metrics.spilled.labels(r.topic).inc()
                settle(r.done, "outbox")
            r.done = None

    async def replay(self) -> None:
        chunk = await self.disk(self.outbox.read, self.options.batch_records)
        if not chunk:
            return
        todo = [(start, r) for start, _, r in chunk if start not in self.replay_acked]
        unsent = await self.send([r for _, r in todo])
        failed = {id(r) for r in unsent}
        for start, r in todo:
            if id(r) not in failed:
                self.replay_acked.add(start)
                self.metrics.replayed.labels(r.topic).inc()
        if not unsent:
            await self.commit(chunk[-1][1])

    async def commit(self, end: Position) -> None:
        await self.disk(self.outbox.commit, end)
        self.replay_acked = {p for p in self.replay_acked if p >= end}

    async def sync_outbox(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.disk(self.outbox.tick)
            except OSError as exc:
                self.complain(f"outbox {self.options.outbox_dir}: fsync failed: {exc}")

    # -- the broker ------------------------------------------------------------------------

    async def connect(self, timeout: float | None = None) -> bool:
        o = self.options
        producer = None
        try:
            async with asyncio.timeout(timeout or o.publish_timeout_ms / 1000 * 2):
                kafka = Kafka(o.bootstrap_servers, o.security)
                await kafka.ensure_topics(o.client_id, o.topic_names, o.topic_options,
                                          request_timeout_ms=o.publish_timeout_ms)
                producer = kafka.producer(
                    o.client_id, enable_idempotence=True, acks="all", compression_type=o.compression,
                    linger_ms=o.linger_ms, max_batch_size=256 << 10, max_request_size=o.max_request_bytes,
                    request_timeout_ms=o.publish_timeout_ms, retry_backoff_ms=100)
                lost = asyncio.Event()
                self.watch(producer, lost)
                await producer.start()
        except Exception as exc:  # any failure to connect only delays delivery
            if producer is not None:
                await self.discard(producer)
            if self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("broker %s: %s; events go to the outbox %s until it answers",
                            o.bootstrap_servers, describe(exc), o.outbox_dir)
            else:
                log.debug("broker %s still unreachable: %s", o.bootstrap_servers, describe(exc))
            return False
        self.producer, self.broker_lost = producer, lost
        self.backoff = 0.1
        self.metrics.connected.set(1)
        if self.down_since is not None:
            log.info("broker %s answers again after %.1f s", o.bootstrap_servers, time.monotonic() - self.down_since)
        else:
            log.info("publishing events to %s", o.bootstrap_servers)
        self.down_since = None
        return True

    def watch(self, producer: AIOKafkaProducer, lost: asyncio.Event) -> None:
        """When one of the producer's connections breaks, ask the brokers for metadata at
        once; if none answers within the publish timeout, the broker counts as down
        (`lost` is set) without waiting for a send to time out."""
        client = producer.client
        closed = client._on_connection_closed  # aiokafka gives each new connection this callback

        def on_closed(conn, reason) -> None:
            closed(conn, reason)
            if reason in (CloseReason.CONNECTION_BROKEN, CloseReason.CONNECTION_TIMEOUT) and \
                    self.producer is producer and self.probing is None:
                self.probing = asyncio.create_task(self.probe(producer, lost), name="vigil-publisher-probe")

        client._on_connection_closed = on_closed

    async def probe(self, producer: AIOKafkaProducer, lost: asyncio.Event) -> None:
        try:
            async with asyncio.timeout(self.options.publish_timeout_ms / 1000):
                answered = await producer.client.force_metadata_update()
        except Exception:  # a timeout, or the producer closed meanwhile
            answered = False
        finally:
            self.probing = None
        if not answered and self.producer is producer:
            self.metrics.connected.set(0)
            lost.set()
            self.wakeup.set()

    async def drop_producer(self, reason) -> None:
        producer, self.producer = self.producer, None
        self.metrics.connected.set(0)
        self.caught_up = False
        self.wait_in_outbox(list(self.hot))
        self.hot.clear()
        if producer is None:
            return
        if reason != "closing":
            self.down_since = time.monotonic()
            log.warning("broker %s: %s; events go to the outbox %s until it answers",
                        self.options.bootstrap_servers, describe(reason), self.options.outbox_dir)
            await self.discard(producer)
        else:
            await producer.stop()

    @staticmethod
    async def discard(producer: AIOKafkaProducer) -> None:
        """Stop a producer without letting it deliver what it still holds: those records
        are in the outbox now, and a late delivery would duplicate them."""
        try:
            async with asyncio.timeout(5):
                # aiokafka's stop() would wait for the broker: end its sender, forget what it holds
                sender = getattr(producer, "_sender", None)
                if sender is not None:
                    await sender.close()
                accumulator = getattr(producer, "_message_accumulator", None)
                if accumulator is not None:
                    accumulator._batches.clear()
                    accumulator._pending_batches.clear()
                await producer.stop()
        except Exception as exc:
            log.debug("discarding a producer: %s", describe(exc))

    # -- bookkeeping -----------------------------------------------------------------------

    async def disk(self, fn, *args):
        """Runs fn in the outbox's thread."""
        return await self.loop.run_in_executor(self.io, fn, *args)

    def lost(self, topic: str, reason: str, n: int) -> None:
        self.metrics.failed.labels(topic, reason).inc(n)
        self.complain(f"events lost ({reason}): {n} for {topic}; see vigil_events_failed_total")

    def lost_all(self, records: list[Record], reason: str, exc: Exception) -> None:
        self.complain(f"outbox {self.options.outbox_dir}: {exc}")
        for r in records:
            self.lost(r.topic, reason, 1)
            settle(r.done, reason)
            r.done = None

    def complain(self, message: str) -> None:
        """Log an error, at most once in 10 s: a full disk must not also fill the log."""
        now = time.monotonic()
        if now - self.last_complaint > 10:
            self.last_complaint = now
            log.error(message)


async def acknowledged(futures: list[asyncio.Future], lost: asyncio.Event) -> None:
    """Waits until every future is done, or `lost` is set."""
    every, gone = asyncio.ensure_future(asyncio.wait(futures)), asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait((every, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        every.cancel()
        gone.cancel()


def settle(on_done: Callable[[str], None] | None, outcome: str) -> None:
    """Tell a publisher's caller what became of its event; its failure is only logged."""
    if on_done is not None:
        try:
            on_done(outcome)
        except Exception:
            log.exception("an event's on_done callback failed")


def parse_dict(topic: str, event: dict) -> Message:
    cls = codec.TOPIC_MESSAGES.get(topic)
    if cls is None:
        raise ValueError(f"topic {topic!r} has no event type; publish a message instead of a dict")
    return json_format.ParseDict(event, cls(), ignore_unknown_fields=True)


def describe(exc) -> str:
    if isinstance(exc, BaseException):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc)


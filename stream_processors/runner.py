"""`vigil process`: the consumer-group runner around ``processor.PartitionState``.

One AIOKafkaConsumer in group ``group_id`` subscribes to vigil.inference.events and
vigil.feedback. The unit of state is a partition *number*: partition p of both topics
(an event and its feedback share a key, so the same partitioner puts them in the same
partition number; aiokafka's default range assignor hands partition p of two topics with
the same partition count to the same member, as Kafka Streams' co-partitioning relies on).
Each fetch of a partition is decoded in one protobuf call (``fast_decode``) and applied to
its state as one batch; what does not decode goes to vigil.deadletter.

Checkpoints: the state of partition number p, together with the next offset of each of
the two topics, is one record on the compacted topic vigil.checkpoints, keyed
``<group>/<p>``. It is written every ``checkpoint_interval`` seconds, when partitions are
revoked, and at shutdown, after the producer has flushed the signals and dead letters
that the state already accounts for. On assignment the latest checkpoint of each new
partition number is loaded and both topics are sought to its offsets (the beginning when
there is none), so a crash replays what came after the last checkpoint into the state of
that checkpoint: no event lost, none counted twice. Signals published between the last
checkpoint and a crash may be published again (at least once). The group's committed
offsets follow the checkpoints, for lag tools; the runner itself never reads them.

The consumer loop and the checkpoints run under eventbus.supervise (tasks process-consume
and process-checkpoint, in vigil_task_up and vigil_task_failures_total): a failure is
logged and counted, and the consumer loop restarts from the offsets its state holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily

from eventbus import cloudevents, codec, compat, service, topics
from eventbus.consumer import dead_letter, decode
from eventbus.kafka import Kafka
from eventbus.state import read_compacted
from eventbus.supervise import Supervisor
from protos import events_pb2
from stream_processors.processor import Out, PartitionState, unusable
from stream_processors.settings import RunnerOptions

log = logging.getLogger(__name__)
compat.install()

INPUTS = (topics.INFERENCE, topics.FEEDBACK)
EXPECTED = {topics.INFERENCE: events_pb2.InferenceEvent, topics.FEEDBACK: events_pb2.FeedbackEvent}
_PROTOBUF = codec.PROTOBUF.encode()
_TYPE_BYTES = {cls: cls.DESCRIPTOR.full_name.encode() for cls in EXPECTED.values()}


def is_protobuf(record, cls) -> bool:
    """Whether the headers say the record is a protobuf ``cls``, read without building the
    whole CloudEvents attribute dict (the per-record cost that dominated decoding)."""
    ce_type = content_type = None
    for k, v in record.headers or ():
        if k == "ce_type":
            ce_type = v
        elif k == "content-type":
            content_type = v
    return (ce_type == _TYPE_BYTES[cls] and record.value is not None
            and (content_type is None or content_type == _PROTOBUF))


def _repeated(cls):
    """A message type with one field, ``repeated cls items = 1``, made at import time.

    A fetch's values, each framed as one such field, parse in one call instead of a call
    per record, which halves the cost of decoding (the bytes of a repeated field's element
    are parsed exactly as the message alone)."""
    name = cls.DESCRIPTOR.name + "Batch"
    pool = cls.DESCRIPTOR.file.pool
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"vigil.process.{name}"))
    except KeyError:
        pass
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=f"vigil/process/{name}.proto", package="vigil.process",
                                             dependency=[cls.DESCRIPTOR.file.name], syntax="proto3")
    fdp.message_type.add(name=name).field.add(name="items", number=1, label=F.LABEL_REPEATED,
                                              type=F.TYPE_MESSAGE, type_name="." + cls.DESCRIPTOR.full_name)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"vigil.process.{name}"))


_BATCH = {cls: _repeated(cls) for cls in EXPECTED.values()}


class _Framing(dict):
    """n -> the tag and length of field 1 holding n bytes (made the first time n is asked)."""

    def __missing__(self, n: int) -> bytes:
        out, k = bytearray(b"\n"), n
        while k >= 0x80:
            out.append(k & 0x7F | 0x80)
            k >>= 7
        out.append(k)
        self[n] = bytes(out)
        return self[n]


_FRAMING = _Framing()


def fast_decode(records: list, cls) -> list:
    """The message of each well-formed protobuf record of type ``cls``, None for any other
    (those take ``eventbus.consumer.decode`` and its reasons)."""
    good = [is_protobuf(r, cls) for r in records]
    values = [r.value for r, g in zip(records, good) if g]
    try:
        items = iter(_BATCH[cls].FromString(b"".join([x for v in values for x in (_FRAMING[len(v)], v)])).items)
    except DecodeError:  # one bad record spoils the lot: one by one, to find it
        return [_decode_one(r.value, cls) if g else None for r, g in zip(records, good)]
    return [next(items) if g else None for g in good]


def _decode_one(value: bytes, cls):
    try:
        return cls.FromString(value)
    except DecodeError:
        return None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.processed = Counter("vigil_processor_events", "Records processed, by topic", ("topic",), registry=r)
        self.dead = Counter("vigil_processor_dead_lettered", "Records sent to vigil.deadletter", ("topic",),
                            registry=r)
        self.signals = Counter("vigil_processor_signals", "Signals published, by kind and drifted",
                               ("kind", "drifted"), registry=r)
        self.checkpoints = Counter("vigil_processor_checkpoints", "Checkpoints written", registry=r)
        self.skipped = Counter("vigil_processor_skipped", "Records already in a checkpoint's state", registry=r)
        self.partitions = Gauge("vigil_processor_partitions", "Partition numbers owned", registry=r)
        self.lag = Gauge("vigil_processor_lag", "Records behind the high watermark, by topic", ("topic",),
                         registry=r)
        self.readings = Readings()
        r.register(self.readings)


class Readings:
    """The latest statistic and threshold of every detector, as gauges, for the model
    versions whose partitions this processor owns (`keep` drops the others after a
    rebalance, so two processors never both show a reading)."""

    LABELS = ("model", "version", "kind", "detector", "feature")

    def __init__(self):
        self.latest: dict[tuple, tuple[float, float | None]] = {}

    def note(self, out: Out) -> None:
        labels = (out.model, out.version, str(out.kind), out.detector, out.feature)
        self.latest[labels] = (out.statistic, out.threshold)

    def keep(self, versions: set[tuple[str, str]]) -> None:
        self.latest = {k: v for k, v in self.latest.items() if k[:2] in versions}

    def collect(self):
        statistic = GaugeMetricFamily("vigil_processor_signal_statistic",
                                      "The latest statistic of each detector (KS D, PSI, ECE, ...)", labels=self.LABELS)
        threshold = GaugeMetricFamily("vigil_processor_signal_threshold",
                                      "What each detector's statistic is compared with", labels=self.LABELS)
        for labels, (stat, limit) in self.latest.items():
            statistic.add_metric(labels, stat)
            if limit is not None:
                threshold.add_metric(labels, limit)
        yield statistic
        yield threshold


class Listener(ConsumerRebalanceListener):
    def __init__(self, runner: "Runner"):
        self.runner = runner

    async def on_partitions_revoked(self, revoked):
        await self.runner.revoked(revoked)

    async def on_partitions_assigned(self, assigned):
        await self.runner.assigned(assigned)


class Runner:
    def __init__(self, options: RunnerOptions, metrics: Metrics | None = None):
        self.o = options
        self.kafka = Kafka(options.bootstrap_servers, options.security)
        self.metrics = metrics or Metrics()
        self.metrics_server = service.MetricsServer(self.metrics.registry, options.metrics_host, options.metrics_port)
        self.source = f"vigil-process/{socket.gethostname()}/{os.getpid()}"
        self.states: dict[int, PartitionState] = {}
        self.lock = asyncio.Lock()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.tasks = Supervisor(self.metrics.registry)
        self.stopping = asyncio.Event()

    @property
    def metrics_port(self) -> int:
        """The port of /metrics (once started; -1: none)."""
        return self.metrics_server.port

    # -- life ---------------------------------------------------------------------------
    async def start(self) -> None:
        o = self.o
        self.metrics_server.start()
        await self.kafka.ensure_topics("vigil-process", [*INPUTS, topics.SIGNALS, topics.DEADLETTER,
                                                         topics.CHECKPOINTS])
        self.producer = self.kafka.producer("vigil-process", enable_idempotence=True, acks="all", linger_ms=5,
                                            max_request_size=16 << 20, compression_type="gzip")
        await self.producer.start()
        self.consumer = self.kafka.consumer(
            "vigil-process", group_id=o.group_id, auto_offset_reset="earliest",
            session_timeout_ms=o.session_timeout_ms, heartbeat_interval_ms=max(300, o.session_timeout_ms // 5),
            max_poll_interval_ms=60_000, rebalance_timeout_ms=max(60_000, o.session_timeout_ms),
            max_partition_fetch_bytes=4 << 20)
        self.consumer.subscribe(list(INPUTS), listener=Listener(self))
        await self.consumer.start()

    async def stop(self) -> None:
        """Checkpoint what is owned and leave the group (its partitions move at once)."""
        if self.consumer is not None:
            async with self.lock:
                await self.checkpoint(list(self.states))
                self.states.clear()
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.metrics_server.stop()

    async def run(self) -> None:
        """The consumer loop and the checkpoints, supervised, until `stopping` is set."""
        consume = self.tasks.start("process-consume", self.consume)
        self.tasks.start("process-checkpoint", self.checkpoints)
        try:
            await consume
        finally:
            await self.tasks.stop()

    async def consume(self) -> None:
        """From the offsets the state holds, so a restart after a failure reads its fetch again;
        until `stopping` is set, with every fetch taken in sent."""
        async with self.lock:
            await self.resume(self.consumer.assignment())
        while not self.stopping.is_set():
            batches = await self.consumer.getmany(timeout_ms=200, max_records=self.o.max_records)
            async with self.lock:
                outs: list = []
                for tp, records in batches.items():
                    self.process(tp, records, outs)
                for item in outs:
                    await self.send(item)

    async def checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.o.checkpoint_interval)
            async with self.lock:
                await self.checkpoint(list(self.states))
                self.update_lag()

    # -- records --------------------------------------------------------------------------
    def process(self, tp: TopicPartition, records, outs: list) -> None:
        """One fetch of one partition (so of one topic): decoded, then applied as a batch."""
        state = self.states.get(tp.partition)
        if state is None:  # revoked while the fetch was on its way
            return
        fresh = state.fresh(tp.topic, records)
        self.metrics.skipped.inc(len(records) - len(fresh))
        cls = EXPECTED[tp.topic]
        messages = []
        for record, message in zip(fresh, fast_decode(fresh, cls)):
            if message is None:
                r = decode(record)
                if r.message is not None and not isinstance(r.message, cls):
                    r.error = f"{r.message.DESCRIPTOR.full_name} is not the event type of {tp.topic}"
                    r.message = None
                if r.message is None:
                    outs.append(r)
                    self.metrics.dead.labels(tp.topic).inc()
                    continue
                message = r.message
            reason = unusable(message)
            if reason:
                r = decode(record)
                r.error = reason
                outs.append(r)
                self.metrics.dead.labels(tp.topic).inc()
                continue
            messages.append(message)
        signals: list = []
        if tp.topic == topics.INFERENCE:
            state.apply_events(messages, signals)
        else:
            state.apply_feedback(messages, signals)
        self.metrics.processed.labels(tp.topic).inc(len(records))
        outs.extend(signals)

    async def send(self, item) -> None:
        if isinstance(item, Out):
            message = signal_message(item, self.source)
            topic, key = topics.SIGNALS, topics.model_key(item.model, item.version).encode()
            self.metrics.signals.labels(str(item.kind), str(item.drifted).lower()).inc()
            self.metrics.readings.note(item)
        else:
            message, topic, key = dead_letter(item, self.source), topics.DEADLETTER, item.key
        headers = cloudevents.headers(message.event_id, message.DESCRIPTOR.full_name, self.source, time.time(),
                                      codec.PROTOBUF)
        await self.producer.send(topic, message.SerializeToString(), key=key, headers=headers)

    # -- checkpoints ----------------------------------------------------------------------
    def checkpoint_key(self, partition: int) -> bytes:
        return f"{self.o.group_id}/{partition}".encode()

    async def checkpoint(self, partitions: list[int]) -> None:
        """Signals and dead letters first, then the state that accounts for them."""
        if not partitions:
            return
        await self.producer.flush()
        futures, commit = [], {}
        for p in partitions:
            st = self.states[p]
            st.expire()
            futures.append(await self.producer.send(topics.CHECKPOINTS, st.encode(), key=self.checkpoint_key(p)))
            for topic, offset in st.offsets.items():
                commit[TopicPartition(topic, p)] = OffsetAndMetadata(offset, "")
        await asyncio.gather(*futures)
        self.metrics.checkpoints.inc(len(partitions))
        try:
            owned = self.consumer.assignment()
            await self.consumer.commit({tp: m for tp, m in commit.items() if tp in owned})
        except Exception as exc:  # informational only: the checkpoints are what counts
            log.debug("committing offsets: %s", exc)

    async def load_checkpoints(self, partitions: set[int]) -> dict[int, bytes]:
        """The latest checkpoint of each partition number (read from the beginning of the
        compacted topic to its end)."""
        wanted = {self.checkpoint_key(p): p for p in partitions}
        found: dict[int, bytes] = {}

        def keep(r):
            if r.key in wanted and r.value is not None:
                found[wanted[r.key]] = r.value
        reader = self.kafka.consumer("vigil-process-checkpoints", max_partition_fetch_bytes=32 << 20,
                                     fetch_max_bytes=64 << 20)
        await reader.start()
        try:
            # a fresh client knows no topic's partitions until it asks: starting with an empty
            # state here would overwrite a checkpoint, so the topic must be seen (TopicMissing if not)
            await read_compacted(self.kafka, reader, topics.CHECKPOINTS, keep)
        finally:
            await reader.stop()
        return found

    # -- rebalancing ----------------------------------------------------------------------
    async def revoked(self, revoked) -> None:
        async with self.lock:
            gone = sorted({tp.partition for tp in revoked} & set(self.states))
            await self.checkpoint(gone)
            for p in gone:
                del self.states[p]
            self.metrics.readings.keep({(m.model, m.version) for st in self.states.values()
                                        for m in st.models.values()})
            self.metrics.partitions.set(len(self.states))
            if gone:
                log.info("partitions %s revoked (checkpointed)", gone)

    async def assigned(self, assigned) -> None:
        async with self.lock:
            numbers = {tp.partition for tp in assigned}
            for p in sorted(numbers):
                owned = {tp.topic for tp in assigned if tp.partition == p}
                if owned != set(INPUTS):
                    log.warning("partition %d assigned for %s only: the topics must have the same number "
                                "of partitions for events and feedback to meet", p, ", ".join(sorted(owned)))
            new = numbers - set(self.states)
            saved = await self.load_checkpoints(new)
            for p in new:
                if p in saved:
                    self.states[p] = PartitionState.decode(saved[p], self.o.settings)
                    log.info("partition %d resumed from its checkpoint at %s", p, self.states[p].offsets)
                else:
                    self.states[p] = PartitionState(p, self.o.settings)
                    log.info("partition %d: no checkpoint, from the beginning", p)
            await self.resume(assigned)
            self.metrics.partitions.set(len(self.states))

    async def resume(self, tps) -> None:
        """Each partition from the next offset its state has not taken in."""
        for tp in tps:
            if tp.partition not in self.states:  # assigned, but assigned() has not run yet: it seeks
                continue
            offset = self.states[tp.partition].offsets.get(tp.topic)
            if offset is None:
                await self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, offset)

    def update_lag(self) -> None:
        lag: dict[str, int] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            st = self.states.get(tp.partition)
            if high is not None and st is not None:
                lag[tp.topic] = lag.get(tp.topic, 0) + max(0, high - st.offsets.get(tp.topic, 0))
        for topic, n in lag.items():
            self.metrics.lag.labels(topic).set(n)


def signal_message(o: Out, source: str) -> events_pb2.Signal:
    s = events_pb2.Signal(event_id=str(uuid.uuid4()), source=source, model=o.model, version=o.version,
                          kind=o.kind, detector=o.detector, feature=o.feature, statistic=o.statistic,
                          drifted=o.drifted, reference_size=o.reference_size, window_size=o.window_size,
                          labels=o.labels, detections=o.detections, events=o.events, window_index=o.window_index,
                          reliability=[events_pb2.ReliabilityBin(lower=b["lower"], upper=b["upper"], count=b["n"],
                                                                 confidence=b["confidence"], accuracy=b["accuracy"])
                                       for b in o.reliability])
    if o.threshold is not None:
        s.threshold = o.threshold
    if o.p_value is not None:
        s.p_value = o.p_value
    if o.value is not None:
        s.value = o.value
    if o.trend is not None:
        s.trend.direction, s.trend.severity, s.trend.slope = o.trend
    if o.recalibration is not None:
        f = o.recalibration
        s.recalibration.CopyFrom(events_pb2.Recalibration(
            temperature=f.temperature, ece_before=f.ece_before, ece_after=f.ece_after, accuracy=f.accuracy,
            fitted=f.fitted, held_out=f.held_out))
    s.time.GetCurrentTime()
    if o.time_s:
        s.window_end.FromNanoseconds(int(o.time_s * 1e9))
    return s


async def serve(options: RunnerOptions, ready=None) -> None:
    """Run until SIGTERM/SIGINT (or ``runner.stopping`` is set)."""
    runner = Runner(options)
    await service.serve(runner, "vigil process", lambda r: (
        f"vigil process: group {options.group_id} on {options.bootstrap_servers}, "
        f"metrics {'on ' + r.metrics_server.url if r.metrics_port >= 0 else 'off'}"),
        ready=ready, run=runner.run, stopping=runner.stopping)

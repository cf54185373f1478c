"""Reading a topic's events, decoded: every partition, without a consumer group (so
nothing is committed and nobody else's offsets move). `vigil events tail` uses it.
A record that does not decode comes with the reason; `dead_letter` wraps it for the
vigil.deadletter topic."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from google.protobuf.message import Message

from eventbus import cloudevents, codec
from eventbus.kafka import Kafka, TopicMissing  # noqa: F401  (TopicMissing: where callers of tail look for it)
from eventbus.security import NONE as NO_SECURITY
from eventbus.security import KafkaSecurity
from protos import events_pb2


@dataclass
class Received:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    timestamp_ms: int
    attributes: dict[str, str]  # CloudEvents attributes and content-type
    value: bytes | None
    message: Message | None     # None when undecodable
    error: str = ""             # why it could not be decoded
    headers: list = field(default_factory=list)  # as received

    def to_dict(self) -> dict:
        out = {"topic": self.topic, "partition": self.partition, "offset": self.offset,
               "key": self.key.decode("utf-8", "replace") if self.key is not None else None,
               "timestamp": cloudevents.rfc3339(self.timestamp_ms / 1000), "ce": self.attributes}
        if self.message is not None:
            out["event"] = codec.to_dict(self.message)
        else:
            out["error"] = self.error
            out["value_base64"] = base64.b64encode(self.value or b"").decode()
        return out


def decode(record) -> Received:
    attributes = cloudevents.attributes(record.headers)
    message, error = None, ""
    try:
        message = codec.decode(record.value, attributes, record.topic)
    except codec.Undecodable as exc:
        error = str(exc)
    return Received(record.topic, record.partition, record.offset, record.key, record.timestamp,
                    attributes, record.value, message, error, list(record.headers or ()))


def dead_letter(r: Received, source: str) -> events_pb2.DeadLetter:
    """What goes to vigil.deadletter (keyed as received) for a record that could not be decoded."""
    letter = events_pb2.DeadLetter(
        event_id=str(uuid.uuid4()), source=source, topic=r.topic, partition=r.partition, offset=r.offset,
        key=r.key or b"", value=r.value or b"", reason=r.error,
        headers=[events_pb2.Header(key=k, value=v if isinstance(v, bytes) else str(v).encode())
                 for k, v in r.headers])
    letter.time.GetCurrentTime()
    return letter


async def tail(bootstrap_servers: str, topic: str, *, from_beginning: bool = False,
               idle_timeout: float | None = None, wait_for_topic: float = 10.0,
               security: KafkaSecurity = NO_SECURITY) -> AsyncIterator[Received]:
    """Yields the topic's records as they come, from the end (or the beginning); stops
    after idle_timeout seconds without a record, if given."""
    from eventbus.state import seek_to_end  # eventbus.state decodes with this module

    kafka = Kafka(bootstrap_servers, security)
    consumer = kafka.consumer("vigil-events-tail")
    await consumer.start()
    try:
        tps = await kafka.partitions(consumer, topic, wait_for_topic)
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await seek_to_end(consumer, tps)
        idle_since = asyncio.get_running_loop().time()
        while True:
            batches = await consumer.getmany(timeout_ms=200)
            now = asyncio.get_running_loop().time()
            if not batches:
                if idle_timeout is not None and now - idle_since > idle_timeout:
                    return
                continue
            idle_since = now
            records = sorted((r for rs in batches.values() for r in rs), key=lambda r: (r.timestamp, r.partition, r.offset))
            for r in records:
                yield decode(r)
    finally:
        await consumer.stop()

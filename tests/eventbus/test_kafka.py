"""The services' Kafka runtime on the real broker: clients from the factory, the wait for a
topic's partitions, a compacted topic read to its end and a reader put at the end, where
ListOffsets may answer a partition's end with the base offset of its last batch."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import TopicPartition

from eventbus import topics
from eventbus.kafka import Kafka, TopicMissing
from eventbus.security import KafkaSecurity
from eventbus.state import read_compacted, read_to_end, seek_to_end, stop_consumer


def name(what: str) -> str:
    return f"test-{what}-{uuid.uuid4().hex[:8]}"


async def fill(kafka: Kafka, topic: str, batches: int, per_batch: int = 7, partitions: int = 2) -> None:
    """`batches` batches of `per_batch` records in partition 0 (key = value), none elsewhere."""
    await kafka.ensure_topics("test-admin", [topic], topics.TopicOptions(partitions=partitions))
    producer = kafka.producer("test-producer")
    await producer.start()
    try:
        for b in range(batches):
            await asyncio.gather(*[await producer.send(topic, b"%d-%d" % (b, i), key=b"%d-%d" % (b, i), partition=0)
                                   for i in range(per_batch)])
    finally:
        await producer.stop()


async def test_the_factory_passes_the_security_settings_to_every_client():
    plain, tls = Kafka("127.0.0.1:1"), Kafka("127.0.0.1:1", KafkaSecurity(security_protocol="SSL"))
    for kafka, protocol in ((plain, "PLAINTEXT"), (tls, "SSL")):
        consumer, producer, admin = kafka.consumer("c"), kafka.producer("p"), kafka.admin("a")
        try:
            made = [consumer._client, producer.client, admin._client]
            assert [c._security_protocol for c in made] == [protocol] * 3
            assert consumer._group_id is None and not consumer._enable_auto_commit  # a reader of its own
        finally:
            await stop_consumer(consumer)
            await producer.stop()
            await admin.close()


def test_ensure_topics_creates_the_missing_ones_once(kafka_broker):
    async def go():
        kafka, topic = Kafka(kafka_broker.bootstrap_servers), name("ensure")
        first = await kafka.ensure_topics("test-admin", [topic], topics.TopicOptions(partitions=3))
        again = await kafka.ensure_topics("test-admin", [topic], topics.TopicOptions(partitions=3))
        consumer = kafka.consumer("test-partitions")
        await consumer.start()
        try:
            parts = await kafka.partitions(consumer, topic, timeout=10)
        finally:
            await stop_consumer(consumer)
        return topic, first, again, parts

    topic, first, again, parts = asyncio.run(go())
    assert first == [topic] and again == []
    assert parts == [TopicPartition(topic, p) for p in range(3)]


def test_waiting_for_a_missing_topic_ends_at_the_deadline_naming_it(kafka_broker):
    async def go(topic: str):
        kafka = Kafka(kafka_broker.bootstrap_servers)
        consumer = kafka.consumer("test-missing")
        await consumer.start()
        try:
            began = time.monotonic()
            with pytest.raises(TopicMissing) as caught:
                await kafka.partitions(consumer, topic, timeout=0.5)
            return caught.value, time.monotonic() - began
        finally:
            await stop_consumer(consumer)

    topic = name("missing")
    error, waited = asyncio.run(go(topic))
    assert isinstance(error, LookupError)
    assert topic in str(error) and kafka_broker.bootstrap_servers in str(error)
    assert 0.5 <= waited < 10


def test_a_compacted_topic_is_read_whole_and_the_reader_follows_from_its_end(kafka_broker):
    async def go(topic: str):
        kafka = Kafka(kafka_broker.bootstrap_servers)
        await fill(kafka, topic, batches=5)
        consumer = kafka.consumer("test-compacted")
        await consumer.start()
        try:
            seen = []
            tps = await read_compacted(kafka, consumer, topic, lambda r: seen.append(r.value), wait_for_topic=10)
            positions = {tp.partition: await consumer.position(tp) for tp in tps}
            producer = kafka.producer("test-producer")
            await producer.start()
            await producer.send_and_wait(topic, b"later", partition=0)
            await producer.stop()
            after = []
            deadline = time.monotonic() + 10
            while not after and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    after += [r.value for r in records]
            return seen, positions, after
        finally:
            await stop_consumer(consumer)

    seen, positions, after = asyncio.run(go(name("compacted")))
    assert seen == [b"%d-%d" % (b, i) for b in range(5) for i in range(7)]
    assert positions == {0: 35, 1: 0}
    assert after == [b"later"]


def test_seek_to_end_skips_the_last_batch_too(kafka_broker):
    """A reader put at the end reads only what comes next, even where ListOffsets names
    the last batch's base offset as the end."""
    async def go(topic: str):
        kafka = Kafka(kafka_broker.bootstrap_servers)
        await fill(kafka, topic, batches=3)
        consumer = kafka.consumer("test-at-end")
        await consumer.start()
        try:
            tps = await kafka.partitions(consumer, topic, timeout=10)
            consumer.assign(tps)
            listed = await consumer.end_offsets(tps)
            ends = await seek_to_end(consumer, tps)
            producer = kafka.producer("test-producer")
            await producer.start()
            await producer.send_and_wait(topic, b"new", partition=0)
            await producer.send_and_wait(topic, b"new too", partition=1)
            await producer.stop()
            after = []  # from where seek_to_end left the reader to the new end: the new records only
            await read_to_end(consumer, tps, lambda r: after.append(r.value), timeout=10)
            return listed, ends, sorted(after)
        finally:
            await stop_consumer(consumer)

    listed, ends, after = asyncio.run(go(name("at-end")))
    assert {tp.partition: offset for tp, offset in ends.items()} == {0: 21, 1: 0}
    assert after == [b"new", b"new too"]
    print(f"ListOffsets said partition 0 ends at {listed[TopicPartition(next(iter(listed)).topic, 0)]}; "
          "it holds 21 records")

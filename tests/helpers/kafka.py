"""Reading what the services wrote, with librdkafka (confluent-kafka) as a reader nobody
here wrote."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def read_topic(bootstrap: str, topic: str, want, count: int, timeout: float = 30.0) -> list:
    """Every record of `topic` (all partitions, from the beginning) for which want(record)
    is true: waits until `count` of them have come (or the timeout passed), then reads on
    to each partition's high watermark, so a duplicate or an extra record shows."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"vigil-test-{uuid.uuid4()}", "enable.auto.commit": False,
        "session.timeout.ms": 6000, "max.poll.interval.ms": 6000, "log_level": 3,
    })
    try:
        partitions = [TopicPartition(topic, p, OFFSET_BEGINNING)
                      for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions]
        consumer.assign(partitions)
        found, deadline = [], time.monotonic() + timeout

        def at_end() -> bool:
            # the high watermark of the last fetch: Tansu's ListOffsets can answer lower
            for tp in consumer.position(partitions):
                high = consumer.get_watermark_offsets(tp, cached=True)[1]
                consumed = max(tp.offset, 0)  # no position yet: nothing consumed from it
                if high < 0 or consumed < high:
                    return False
            return True

        while time.monotonic() < deadline and (len(found) < count or not at_end()):
            record = consumer.poll(0.2)
            if record is not None and not record.error() and want(record):
                found.append(record)
        return found
    finally:
        consumer.close()

"""Reading a topic to its end, and a compacted topic as state: every partition from the
beginning to its end, then following new records. No consumer group, so nothing is
committed and every reader sees every record.

The end of a partition is the high watermark of a fetch response answered after the
reading began, never what ListOffsets answers: Tansu may answer ListOffsets with the base
offset of a partition's last batch, which would leave that batch unread (a checkpoint or
a snapshot missed, and then overwritten). So

- `read_to_end` is the one way every service reads partitions to their end (the rollout
  state, alerting's state, the processors' checkpoints, all through `read_compacted`);
- `seek_to_end` is the one way a reader starts at the end of partitions (new records
  only), by reading what lies between ListOffsets' answer and the high watermark.

The inference servers and the rollout controller follow vigil.rollout with `TopicReader`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from eventbus import compat
from eventbus.consumer import Received, decode
from eventbus.kafka import Kafka
from eventbus.security import NONE as NO_SECURITY
from eventbus.security import KafkaSecurity

log = logging.getLogger(__name__)
compat.install()


async def read_to_end(consumer, tps: list[TopicPartition], on_record: Callable, timeout: float = 60.0) -> None:
    """Hand every record of `tps`, from where `consumer` stands to the partitions' end, to
    `on_record`, in log order per partition; TimeoutError, naming the topic, if the end is
    not reached within `timeout` seconds. The partitions must be assigned and not paused.

    The end is the high watermark of a fetch response answered after this call began (a
    response from earlier may be stale), not what ListOffsets answers."""
    if not tps:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    began_ms = int(time.time() * 1000)  # aiokafka stamps each fetch response with the wall clock, in ms
    while True:
        batches = await consumer.getmany(*tps, timeout_ms=200)
        for records in batches.values():
            for r in records:
                on_record(r)
        if await _at_end(consumer, tps, began_ms):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{tps[0].topic} was not read to its end within {timeout:g}s")


async def _at_end(consumer, tps, began_ms: int) -> bool:
    for tp in tps:
        high, fetched = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
        if high is None or fetched is None or fetched < began_ms or await consumer.position(tp) < high:
            return False
    return True


async def seek_to_end(consumer, tps: list[TopicPartition], timeout: float = 60.0) -> dict[TopicPartition, int]:
    """Put each of `tps` at its end, as `read_to_end` finds it, so that the next records
    read are those written from now on; returns those offsets. The partitions must be
    assigned and not paused. What lies between ListOffsets' answer and the high watermark
    (on Tansu, the last batch) is read and dropped."""
    if not tps:
        return {}
    await consumer.seek_to_end(*tps)
    await read_to_end(consumer, tps, lambda r: None, timeout)
    return {tp: await consumer.position(tp) for tp in tps}


async def read_compacted(kafka: Kafka, consumer, topic: str, on_record: Callable, wait_for_topic: float = 30.0,
                         timeout: float = 60.0) -> list[TopicPartition]:
    """Assign `consumer` every partition of `topic` (waiting up to `wait_for_topic` seconds
    for them, see Kafka.partitions) and hand every record, from the beginning to the end,
    to `on_record`, in log order per partition; returns the partitions, assigned and at
    their end, so the caller may go on following them."""
    tps = await kafka.partitions(consumer, topic, wait_for_topic)
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    await read_to_end(consumer, tps, on_record, timeout)
    return tps


class TopicReader:
    """`await start()` reads `topic` to its end and returns those records, decoded, in
    log order per partition; `await follow(handler)` then hands each newer record to
    handler until it is cancelled (a failure of the handler is logged, the record skipped).
    `stop()` closes the consumer."""

    def __init__(self, bootstrap_servers: str, topic: str, client_id: str = "vigil-state",
                 wait_for_topic: float = 30.0, security: KafkaSecurity = NO_SECURITY):
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.kafka = Kafka(bootstrap_servers, security)
        self.client_id, self.wait_for_topic = client_id, wait_for_topic
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> list[Received]:
        self.consumer = self.kafka.consumer(self.client_id, auto_offset_reset="earliest")
        await self.consumer.start()
        out: list[Received] = []
        try:
            await read_compacted(self.kafka, self.consumer, self.topic, lambda r: out.append(decode(r)),
                                 self.wait_for_topic)
        except BaseException:
            await self.stop()
            raise
        return out

    async def follow(self, handler: Callable[[Received], Awaitable[None] | None]) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    try:
                        result = handler(decode(r))
                        if asyncio.iscoroutine(result):
                            await result
                    except Exception:
                        log.exception("handling %s/%d@%d", r.topic, r.partition, r.offset)

    async def stop(self) -> None:
        if self.consumer is not None:
            await stop_consumer(self.consumer)
            self.consumer = None


async def stop_consumer(consumer) -> None:
    """consumer.stop(), which aiokafka lets raise CancelledError (its fetcher's own
    cancelled retry) when the broker is gone; that one is swallowed, ours is not."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
    except Exception as exc:
        log.warning("stopping a consumer: %s", exc)

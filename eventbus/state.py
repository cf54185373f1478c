"""Reading a compacted topic as state: every partition from the beginning to its end,
then following new records. No consumer group, so nothing is committed and every reader
sees every record. The inference servers and the rollout controller read vigil.rollout
this way; `read_to_end` is the one way every service reads a topic to its end (alerting
its state, the processors their checkpoints)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from eventbus import compat
from eventbus.consumer import Received, TopicMissing, decode
from eventbus.security import NONE as NO_SECURITY
from eventbus.security import KafkaSecurity

log = logging.getLogger(__name__)
compat.install()


async def read_to_end(consumer, tps: list[TopicPartition], on_record: Callable, timeout: float = 60.0) -> None:
    """Hand every record of `tps`, from where `consumer` stands to the partitions' end, to
    `on_record`, in log order per partition.

    The end is the high watermark of a fetch response, not what ListOffsets answers: Tansu
    may answer it with the base offset of a partition's last batch, which would leave that
    batch unread (a checkpoint or a snapshot missed, and then overwritten)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        batches = await consumer.getmany(*tps, timeout_ms=200)
        for records in batches.values():
            for r in records:
                on_record(r)
        if await _at_end(consumer, tps):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"{tps[0].topic} was not read to its end within {timeout:g}s")


async def _at_end(consumer, tps) -> bool:
    for tp in tps:
        high = consumer.highwater(tp)
        if high is None or await consumer.position(tp) < high:
            return False
    return True


class TopicReader:
    """`await start()` reads `topic` to its end and returns those records, decoded, in
    log order per partition; `await follow(handler)` then hands each newer record to
    handler until it is cancelled (a failure of the handler is logged, the record skipped).
    `stop()` closes the consumer."""

    def __init__(self, bootstrap_servers: str, topic: str, client_id: str = "vigil-state",
                 wait_for_topic: float = 30.0, security: KafkaSecurity = NO_SECURITY):
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.security = security
        self.client_id, self.wait_for_topic = client_id, wait_for_topic
        self.consumer: AIOKafkaConsumer | None = None

    async def start(self) -> list[Received]:
        c = self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None,
                                             enable_auto_commit=False, client_id=self.client_id,
                                             auto_offset_reset="earliest", **self.security.client_kwargs())
        await c.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_for_topic
        while not (partitions := c.partitions_for_topic(self.topic)):
            if loop.time() > deadline:
                await self.stop()
                raise TopicMissing(f"topic {self.topic} does not exist on {self.bootstrap_servers}")
            await c.topics()
            await asyncio.sleep(0.2)
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        out: list[Received] = []
        await read_to_end(c, tps, lambda r: out.append(decode(r)))
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

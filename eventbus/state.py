"""Reading a compacted topic as state: every partition from the beginning to its end
offset (what was there when reading began), then following new records. No consumer
group, so nothing is committed and every reader sees every record. The inference
servers and the rollout controller read vigil.rollout this way."""

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
        end = await c.end_offsets(tps)
        out: list[Received] = []
        async def behind() -> bool:
            for tp in tps:
                if await c.position(tp) < end[tp]:
                    return True
            return False

        while await behind():
            batches = await c.getmany(*tps, timeout_ms=200)
            for tp, records in batches.items():
                out.extend(decode(r) for r in records if r.offset < end[tp])
                if records and records[-1].offset >= end[tp]:  # past the end: keep them for follow()
                    c.seek(tp, end[tp])
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

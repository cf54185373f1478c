"""Following the topics into the model: one consumer, no consumer group (nothing is
committed, every page reads everything), each topic assigned as soon as it exists.

vigil.rollout and vigil.alerts are read from their beginning (the state of every model
and alert); vigil.signals and vigil.inference.events from the last `backlog` records of
each partition, so a page opened on a long-running loop starts with recent history
without reading all of it. A partition's end is its high watermark, found as every
service finds it (eventbus.state.seek_to_end), not what ListOffsets answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from eventbus import topics
from eventbus.consumer import decode
from eventbus.security import NONE as NO_SECURITY
from eventbus.kafka import Kafka
from eventbus.security import KafkaSecurity
from eventbus.state import seek_to_end, stop_consumer

log = logging.getLogger(__name__)

FROM_BEGINNING = (topics.ROLLOUT, topics.ALERTS)
TOPICS = (topics.ROLLOUT, topics.ALERTS, topics.SIGNALS, topics.INFERENCE)


class Reader:
    def __init__(self, bootstrap_servers: str, handle: Callable[[object, float], None], backlog: int = 2000,
                 security: KafkaSecurity = NO_SECURITY):
        self.bootstrap_servers, self.handle, self.backlog, self.security = bootstrap_servers, handle, backlog, security
        self.kafka = Kafka(bootstrap_servers, security)
        self.consumer: AIOKafkaConsumer | None = None
        self.offsets: dict[TopicPartition, int] = {}  # the next offset to read of every assigned partition
        self.undecodable = 0

    @property
    def following(self) -> list[str]:
        return sorted({tp.topic for tp in self.offsets})

    async def start(self) -> None:
        self.consumer = self.kafka.consumer("vigil-ui")
        await self.consumer.start()

    async def stop(self) -> None:
        if self.consumer is not None:
            await stop_consumer(self.consumer)
            self.consumer = None

    async def run(self) -> None:
        """Reads until cancelled; after a failure a new run resumes at the offsets reached."""
        loop = asyncio.get_running_loop()
        await self._assign()
        checked = loop.time()
        while True:
            if len(self.following) < len(TOPICS) and loop.time() - checked > 1.0:
                await self._assign()
                checked = loop.time()
            if not self.offsets:  # getmany would wait for an assignment, without looking for topics again
                await asyncio.sleep(0.2)
                continue
            batches = await self.consumer.getmany(timeout_ms=200, max_records=2000)
            for tp, records in batches.items():
                for r in records:
                    received = decode(r)
                    if received.message is None:
                        self.undecodable += 1
                        log.warning("%s/%d@%d: %s", r.topic, r.partition, r.offset, received.error)
                    else:
                        self.handle(received.message, r.timestamp / 1000)
                    self.offsets[tp] = r.offset + 1

    async def _assign(self) -> None:
        """Assign every partition of the topics that exist, each at its next offset (a new
        one at its start), since assigning anew forgets the positions."""
        unknown = {t for t in TOPICS if not self.consumer.partitions_for_topic(t)}
        if unknown & await self.consumer.topics():
            # created since the consumer started: only a new one learns their partitions
            await self.stop()
            await self.start()
        c = self.consumer
        new = [TopicPartition(t, p) for t in TOPICS for p in sorted(c.partitions_for_topic(t) or ())
               if TopicPartition(t, p) not in self.offsets]
        if not new and set(c.assignment()) == set(self.offsets):
            return
        if new:
            begin = await c.beginning_offsets(new)
            recent = [tp for tp in new if tp.topic not in FROM_BEGINNING]
            end = {}
            if recent:
                c.assign(recent)  # for a while: to find where they end
                end = await seek_to_end(c, recent)
            for tp in new:
                self.offsets[tp] = begin[tp] if tp.topic in FROM_BEGINNING else max(begin[tp], end[tp] - self.backlog)
        c.assign(list(self.offsets))
        for tp, offset in self.offsets.items():
            c.seek(tp, offset)

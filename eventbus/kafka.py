"""Every Kafka client of Vigil is made here, and here it waits for a topic's partitions.

`Kafka(bootstrap_servers, security)` says where the brokers are and how to talk to them
(SASL and TLS, see eventbus/security.py); its `consumer`, `producer` and `admin` make
aiokafka clients with those settings and the client id given, the rest of aiokafka's
keyword arguments passed through. A consumer is made without a consumer group and
without automatic commits unless asked for, since most of Vigil's readers assign
partitions themselves. Nothing here connects until the client is started.

`Kafka.partitions(consumer, topic)` waits, up to a deadline, until the consumer's metadata names
the topic's partitions; a fresh client knows none until it asks, and starting without
them would read nothing (or, for a checkpoint, overwrite state that was there). The
error at the deadline, `TopicMissing` (a LookupError), names the topic and the brokers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from eventbus import compat, topics
from eventbus.security import KafkaSecurity

compat.install()  # every producer made here may be idempotent, also against Tansu


class TopicMissing(LookupError):
    """A topic that the brokers do not name within the time allowed; the message names both."""


@dataclass(frozen=True)
class Kafka:
    bootstrap_servers: str
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS (repr hides passwords)

    def consumer(self, client_id: str, *, group_id: str | None = None, enable_auto_commit: bool = False,
                 **kwargs) -> AIOKafkaConsumer:
        """A consumer (not started): without a group unless `group_id` is given."""
        return AIOKafkaConsumer(bootstrap_servers=self.bootstrap_servers, client_id=client_id, group_id=group_id,
                                enable_auto_commit=enable_auto_commit, **kwargs, **self.security.client_kwargs())

    def producer(self, client_id: str, **kwargs) -> AIOKafkaProducer:
        """A producer (not started)."""
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, client_id=client_id, **kwargs,
                                **self.security.client_kwargs())

    def admin(self, client_id: str, **kwargs) -> AIOKafkaAdminClient:
        """An admin client (not started)."""
        return AIOKafkaAdminClient(bootstrap_servers=self.bootstrap_servers, client_id=client_id, **kwargs,
                                   **self.security.client_kwargs())

    async def ensure_topics(self, client_id: str, names, options: topics.TopicOptions | None = None,
                            **kwargs) -> list[str]:
        """Create whichever of `names` the brokers lack (see topics.ensure_topics) with an
        admin client of its own, closed again; returns those created."""
        admin = self.admin(client_id, **kwargs)
        try:
            await admin.start()
            return await topics.ensure_topics(admin, names, options or topics.TopicOptions())
        finally:
            await admin.close()

    async def partitions(self, consumer: AIOKafkaConsumer, topic: str, timeout: float = 30.0) -> list[TopicPartition]:
        """The partitions of `topic`, in order, once `consumer`'s metadata names them;
        TopicMissing, naming the topic and these brokers, if it does not within `timeout`
        seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (numbers := consumer.partitions_for_topic(topic)):
            if loop.time() > deadline:
                raise TopicMissing(f"topic {topic} does not exist on {self.bootstrap_servers} (waited {timeout:g}s)")
            await consumer.topics()  # asks the brokers for metadata again
            await asyncio.sleep(0.1)
        return [TopicPartition(topic, p) for p in sorted(numbers)]

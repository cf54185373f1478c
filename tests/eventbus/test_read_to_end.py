"""Reading a topic to its end on the real broker, where ListOffsets may answer a
partition's end with the base offset of its last batch."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventbus.state import read_to_end


async def read_back(bootstrap: str) -> tuple[list, dict]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("to-its-end", 2, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    for batch in range(5):  # five batches in partition 0, none in partition 1
        await asyncio.gather(*[await producer.send("to-its-end", b"%d-%d" % (batch, i), partition=0)
                               for i in range(7)])
    await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition("to-its-end", 0), TopicPartition("to-its-end", 1)]
        consumer.assign(tps)
        listed = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        seen = []
        await read_to_end(consumer, tps, lambda r: seen.append(r.value))
        return seen, listed
    finally:
        await consumer.stop()


def test_every_batch_is_read_whatever_list_offsets_answers(kafka_broker):
    seen, listed = asyncio.run(read_back(kafka_broker.bootstrap_servers))
    assert seen == [b"%d-%d" % (b, i) for b in range(5) for i in range(7)]
    print(f"ListOffsets said partition 0 ends at {listed[TopicPartition('to-its-end', 0)]}; it holds 35 records")

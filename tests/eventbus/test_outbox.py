"""The on-disk outbox: order, restarts, fsync schedule, and what goes wrong with disks
(a torn or damaged segment, a full disk) reported and counted, never a crash.

The last tests run the real thing: a server killed with SIGKILL while its events sit in
the outbox, then started again; and a server that finds a damaged segment at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import grpc
import pytest

from eventbus import topics
from eventbus.broker import EmbeddedBroker, free_port
from eventbus.outbox import Outbox, OutboxFull, Record
from eventbus.publisher import Publisher, PublisherOptions
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from protos import events_pb2, llm_pb2_grpc
from tests.helpers.kafka import read_topic
from tests.helpers.serving import TINY, generate, inference_event, kafka_server, metric
from tests.helpers.waiting import wait_until


def rec(i: int, key: str = "m/1") -> Record:
    return Record(topics.INFERENCE, key.encode(), f"value-{i}".encode() * 3, [("ce_id", str(i).encode())], 1000 + i)


def values(chunk) -> list[bytes]:
    return [r.value for _, _, r in chunk]


def segments(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".seg" in p.name)


def test_records_come_back_in_order_across_segments_and_restarts(tmp_path):
    box = Outbox(tmp_path, segment_bytes=200, fsync_ms=-1).open()
    for i in range(10):
        box.append([rec(i)])
    assert len(segments(tmp_path)) > 2
    first = box.read(4)
    assert values(first) == [rec(i).value for i in range(4)]
    assert first[0][2].headers == [("ce_id", b"0")] and first[0][2].timestamp_ms == 1000
    box.commit(first[-1][1])
    box.close()

    box = Outbox(tmp_path, segment_bytes=200).open()  # a restart: the cursor holds
    rest = box.read(100)
    assert values(rest) == [rec(i).value for i in range(4, 10)]
    box.append([rec(10)])  # a new segment, after the old ones
    assert values(box.read(100))[-1] == rec(10).value
    box.commit(box.read(100)[-1][1])
    assert box.empty() and len(segments(tmp_path)) == 1  # the one appended to stays until close
    box.close()
    assert not tmp_path.exists()  # an empty outbox leaves nothing behind


def test_a_second_process_cannot_take_the_same_outbox(tmp_path):
    box = Outbox(tmp_path).open()
    with pytest.raises(OSError) as busy:
        Outbox(tmp_path).open()
    assert busy.value.errno == errno.EBUSY
    box.close()
    Outbox(tmp_path).open().close()


def test_fsync_follows_the_schedule(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    every = Outbox(tmp_path / "every", fsync_ms=0).open()
    every.append([rec(0)])
    every.append([rec(1)])
    assert len(synced) >= 2
    synced.clear()
    later = Outbox(tmp_path / "later", fsync_ms=50).open()
    later.append([rec(0)])
    later.tick()
    assert synced == []
    time.sleep(0.06)
    later.tick()
    assert len(synced) == 2  # the segment, and the folder that names it
    synced.clear()
    never = Outbox(tmp_path / "never", fsync_ms=-1).open()
    never.append([rec(0)])
    time.sleep(0.01)
    never.tick()
    never.close()
    assert synced == []


def test_a_torn_tail_is_reported_and_the_rest_delivered(tmp_path):
    box = Outbox(tmp_path, fsync_ms=-1).open()
    box.append([rec(0), rec(1), rec(2)])
    box.close()
    [name] = segments(tmp_path)
    path = tmp_path / name
    os.truncate(path, path.stat().st_size - 5)  # a power cut in the middle of the last frame

    reports = []
    box = Outbox(tmp_path, on_corrupt=lambda *a: reports.append(a)).open()
    assert values(box.read(10)) == [rec(0).value, rec(1).value]
    assert len(reports) == 1 and "torn" in reports[0][2]
    assert (tmp_path / (name + ".corrupt")).exists()
    box.append([rec(3)])
    assert values(box.read(10)) == [rec(0).value, rec(1).value, rec(3).value]


def test_a_damaged_segment_is_set_aside_and_reading_goes_on(tmp_path):
    box = Outbox(tmp_path, segment_bytes=200, fsync_ms=-1).open()  # two records a segment
    for i in range(6):
        box.append([rec(i)])
    box.close()
    first = tmp_path / segments(tmp_path)[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF  # inside the second frame of the first segment
    first.write_bytes(bytes(data))
    reports = []
    box = Outbox(tmp_path, segment_bytes=200, on_corrupt=lambda *a: reports.append(a)).open()
    got = values(box.read(100))
    assert got == [rec(i).value for i in (0, 2, 3, 4, 5)]
    assert [r[2].split(";")[0] for r in reports] == ["CRC mismatch"]
    box.commit(box.read(100)[-1][1])
    assert box.empty()


def test_a_full_disk_fails_the_batch_and_leaves_no_partial_frame(tmp_path, monkeypatch):
    box = Outbox(tmp_path, fsync_ms=-1).open()
    box.append([rec(0)])
    size = box.pending_bytes

    def half_then_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        return len(data) // 2

    monkeypatch.setattr(Outbox, "write", staticmethod(half_then_full))
    with pytest.raises(OSError) as full:
        box.append([rec(1), rec(2)])
    assert full.value.errno == errno.ENOSPC
    assert box.pending_bytes == size and (tmp_path / segments(tmp_path)[0]).stat().st_size == size
    monkeypatch.undo()
    box.append([rec(3)])
    assert values(box.read(10)) == [rec(0).value, rec(3).value]


def test_the_size_limit_refuses_more(tmp_path):
    box = Outbox(tmp_path, max_bytes=100).open()
    box.append([rec(0)])
    with pytest.raises(OutboxFull):
        box.append([rec(i) for i in range(1, 5)])


# -- the publisher, when disks and queues fail ----------------------------------------


def unreachable() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


async def test_publisher_counts_what_it_cannot_keep_and_keeps_running(tmp_path, monkeypatch):
    p = Publisher(PublisherOptions(bootstrap_servers=unreachable(), outbox_dir=str(tmp_path), queue_size=5,
                                   publish_timeout_ms=500))
    await p.start()
    try:
        assert not p.connected
        monkeypatch.setattr(Outbox, "write", staticmethod(lambda fd, data: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device"))))
        for i in range(3):
            p.publish(topics.INFERENCE, "m/1", events_pb2.InferenceEvent(request_id=f"lost-{i}"))
        await wait_for(lambda: p.metrics.failed.labels(topics.INFERENCE, "outbox_write")._value.get() == 3)
        monkeypatch.undo()
        for i in range(8):  # more than memory holds, at once: the outbox keeps them all
            p.publish(topics.INFERENCE, "m/1", events_pb2.InferenceEvent(request_id=f"kept-{i}"))
        assert p.metrics.spilled.labels(topics.INFERENCE)._value.get() == 8
        kept = [events_pb2.InferenceEvent.FromString(r.value).request_id for _, _, r in p.outbox.read(100)]
        assert kept == [f"kept-{i}" for i in range(8)]
        assert not p.tasks[0].done()
    finally:
        await p.stop()


async def test_a_burst_beyond_what_memory_holds_is_sent_from_the_outbox_in_order(tmp_path, kafka_broker):
    p = Publisher(PublisherOptions(bootstrap_servers=kafka_broker.bootstrap_servers, outbox_dir=str(tmp_path),
                                   queue_size=10, topic_options=topics.TopicOptions(partitions=3)))
    await p.start()
    try:
        assert p.connected
        tag = f"burst-{uuid.uuid4().hex[:8]}"
        for i in range(30):  # at once: 10 are kept in memory, the other 20 only in the outbox
            p.publish(topics.INFERENCE, "m/1", events_pb2.InferenceEvent(request_id=f"{tag}-{i}"))
        assert await p.flush(20)
        assert p.metrics.spilled.labels(topics.INFERENCE)._value.get() == 20
        assert p.metrics.replayed.labels(topics.INFERENCE)._value.get() == 20
        assert p.metrics.published.labels(topics.INFERENCE)._value.get() == 30
    finally:
        await p.stop()
    records = await asyncio.to_thread(read_topic, kafka_broker.bootstrap_servers, topics.INFERENCE,
                                      lambda r: tag.encode() in r.value(), 30)
    assert [inference_event(r).request_id for r in records] == [f"{tag}-{i}" for i in range(30)]


async def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_an_undecodable_record_becomes_a_dead_letter_with_the_reason():
    from types import SimpleNamespace

    from eventbus.consumer import dead_letter, decode

    raw = SimpleNamespace(topic=topics.INFERENCE, partition=2, offset=41, key=b"m/1", timestamp=1_000,
                          value=b"\xff\xff not protobuf",
                          headers=[("ce_type", b"vigil.events.v1.InferenceEvent"), ("content-type", b"application/protobuf")])
    received = decode(raw)
    assert received.message is None and "InferenceEvent as application/protobuf" in received.error
    letter = dead_letter(received, "vigil-processors/test")
    assert (letter.topic, letter.partition, letter.offset, letter.key, letter.value) == (
        topics.INFERENCE, 2, 41, b"m/1", raw.value)
    assert letter.reason == received.error and [h.key for h in letter.headers] == ["ce_type", "content-type"]
    assert decode(SimpleNamespace(**{**vars(raw), "headers": [("ce_type", b"acme.Unknown")]})).error == \
        "ce_type 'acme.Unknown' is not a Vigil event"


# -- whole servers ----------------------------------------------------------------------

VIGIL = [sys.executable, "-m", "vigil.cli"]


def start_vigil(args: list[str]) -> tuple[subprocess.Popen, str, str]:
    """`vigil serve ARGS` once it serves; a thread then reads its output on, so that a
    full pipe never stops it."""
    proc = subprocess.Popen([*VIGIL, "serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        match = re.search(r"gRPC on ([\d.]+:\d+).*metrics on (\S+)", line)
        if match:
            threading.Thread(target=collections.deque, args=(proc.stdout, 0), daemon=True).start()
            return proc, match.group(1), match.group(2)
    raise AssertionError(f"vigil serve exited with {proc.wait()} before serving")


def test_events_in_the_outbox_survive_a_killed_server(tiny_llama, tmp_path):
    port = free_port()
    args = ["--model", str(tiny_llama), "--model-name", TINY, "--quantize", "none", "--port", "0",
            "--metrics-port", "0", "--bootstrap-servers", f"127.0.0.1:{port}", "--outbox-dir", str(tmp_path),
            "--publish-timeout-ms", "1000", "--topic-partitions", "2"]
    tag = f"killed-{uuid.uuid4().hex[:8]}"
    sent = [f"{tag}-{i}" for i in range(8)]
    proc, address, metrics_url = start_vigil(args)  # no broker yet: everything goes to the outbox
    try:
        with grpc.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            for rid in sent:
                generate(stub, rid)
        deadline = time.monotonic() + 20
        while metric(metrics_url, "vigil_events_spilled_total", topic=topics.INFERENCE) < len(sent):
            assert time.monotonic() < deadline, "events never reached the outbox"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert any(name.endswith(".seg") for name in os.listdir(tmp_path))

    with EmbeddedBroker(port=port) as broker:
        proc, address, _ = start_vigil(args)
        try:
            records = read_topic(broker.bootstrap_servers, topics.INFERENCE, lambda r: tag.encode() in r.value(),
                                 len(sent))
            assert [inference_event(r).request_id for r in records] == sent
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_damaged_segment_at_start_up_is_counted_and_the_server_serves(start_server, tiny_llama, tmp_path,
                                                                        kafka_broker):
    folder = tmp_path / "outbox"
    tag = f"damaged-{uuid.uuid4().hex[:8]}"
    encoder = Publisher(PublisherOptions(bootstrap_servers="", outbox_dir=str(folder)))
    box = Outbox(folder, segment_bytes=900, fsync_ms=-1).open()
    for i in range(9):
        event = events_pb2.InferenceEvent(request_id=f"{tag}-{i}", model=TINY, version="1")
        box.append([encoder.encode(topics.INFERENCE, f"{TINY}/1", event, time.time())])
    box.close()
    names = segments(folder)
    assert len(names) >= 2
    first = folder / names[0]
    data = bytearray(first.read_bytes())
    data[len(data) // 2] ^= 0xFF
    first.write_bytes(bytes(data))

    server = kafka_server(start_server, tiny_llama, tmp_path, kafka_broker.bootstrap_servers, outbox_dir=str(folder))
    assert server.call(server.server.publisher.flush(30))
    assert metric(server.metrics_url, "vigil_outbox_corrupt_segments_total") == 1
    assert (folder / (names[0] + ".corrupt")).exists()
    with grpc.insecure_channel(server.address) as channel:
        generate(llm_pb2_grpc.LLMStub(channel), f"{tag}-after")
    assert server.call(server.server.publisher.flush(30))
    records = read_topic(kafka_broker.bootstrap_servers, topics.INFERENCE, lambda r: tag.encode() in r.value(), 20,
                         timeout=5)
    got = [inference_event(r).request_id for r in records]
    assert got[-1] == f"{tag}-after" and got[-2] == f"{tag}-8"  # the later segments, then the new event
    assert got[0] == f"{tag}-0" and len(got) < 10  # part of the damaged segment is gone


END_MARKER = "vigil-test-end-"


def read_to_end(bootstrap: str, topic: str) -> list:
    """Every record of `topic` up to now. Tansu's end offsets can be too low (a batch's base
    offset), so a marker is written at the end of each partition and read up to it."""
    marker = f"{END_MARKER}{uuid.uuid4()}".encode()
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "log_level": 3})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"vigil-test-{uuid.uuid4()}",
                         "enable.auto.commit": False, "log_level": 3})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for p in partitions:
            producer.produce(topic, marker, partition=p)
        assert producer.flush(10) == 0, "the end markers were not acknowledged"
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records, ended = [], set()
        deadline = time.monotonic() + 30
        while len(ended) < len(partitions):
            assert time.monotonic() < deadline, f"{topic} not read to its end"
            record = consumer.poll(0.2)
            if record is None or record.error():
                continue
            if record.value() == marker:
                ended.add(record.partition())
            elif not record.value().startswith(END_MARKER.encode()):  # an earlier call's
                records.append(record)
        return records
    finally:
        consumer.close()


def serve_until_killed(proc: subprocess.Popen, address: str, tag: str, kill_after: int,
                       clients: int = 3) -> tuple[list[list[str]], set[str]]:
    """Generate calls from `clients` threads, each one after the other, until `kill_after`
    have been answered; then SIGKILL. Each client's request ids in the order sent, and
    the ids that were answered (accepted)."""
    sent: list[list[str]] = [[] for _ in range(clients)]
    accepted: set[str] = set()
    stop = threading.Event()

    def client(c: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            while not stop.is_set():
                rid = f"{tag}-{c}-{len(sent[c])}"
                sent[c].append(rid)
                try:
                    generate(stub, rid, max_tokens=2)
                except grpc.RpcError:
                    return
                accepted.add(rid)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(accepted) >= kill_after, 60, "the server answered too few requests")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for t in threads:
            t.join(70)
    return sent, accepted


def test_no_accepted_event_is_lost_when_the_server_is_killed_at_random_moments(tiny_llama, tmp_path):
    """kill -9 of `vigil serve` at a random moment, the broker down (killed just before,
    so inside the publish timeout) or up, many times; after each, the server is started
    again on the same outbox (after an outage, sometimes killed again as soon as it
    serves, while it replays) and the topic read to its end: every answered request has
    its event, in order per client, and an event that comes twice is the same event (one
    ce_id), which happens only where the broker took it before a kill."""
    seed = int(os.environ.get("VIGIL_TEST_SEED", time.time_ns() % (1 << 32)))
    rng = random.Random(seed)
    broker = EmbeddedBroker().start()
    args = ["--model", str(tiny_llama), "--model-name", TINY, "--quantize", "none", "--port", "0",
            "--metrics-port", "0", "--bootstrap-servers", broker.bootstrap_servers, "--outbox-dir", str(tmp_path),
            "--topic-partitions", "2"]  # the default publish timeout, 5 s
    proc, address, metrics_url = start_vigil(args)
    answered = duplicated = 0
    try:
        for i in range(10):
            outage = i % 2 == 0
            context = f"seed {seed}, round {i} ({'broker down' if outage else 'broker up'}"
            if outage:
                broker.kill()
            tag = f"kill-{uuid.uuid4().hex[:8]}"
            sent, accepted = serve_until_killed(proc, address, tag, rng.randint(0, 20))
            replay_killed = outage and rng.random() < 0.5
            context += ", killed again while replaying)" if replay_killed else ")"
            if outage:
                broker.start()  # a fresh, empty broker on the same port
            proc, address, metrics_url = start_vigil(args)
            if replay_killed:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc, address, metrics_url = start_vigil(args)
            wait_until(lambda: metric(metrics_url, "vigil_events_broker_connected") == 1 and
                       metric(metrics_url, "vigil_outbox_bytes") == 0, 60, f"{context}: the outbox was not replayed")

            ce_ids: dict[str, set[bytes]] = collections.defaultdict(set)
            copies: collections.Counter = collections.Counter()
            for record in read_to_end(broker.bootstrap_servers, topics.INFERENCE):
                rid = inference_event(record).request_id
                if rid.startswith(tag):
                    copies[rid] += 1
                    ce_ids[rid].add(dict(record.headers())["ce_id"])
            lost = sorted(accepted - set(copies))
            assert not lost, f"{context}: {len(lost)} of {len(accepted)} answered requests have no event: {lost[:5]}"
            assert all(len(ids) == 1 for ids in ce_ids.values()), f"{context}: a request has two different events"
            first = list(copies)  # in the order of their first copies
            for ids in sent:
                mine = set(ids)
                assert [rid for rid in first if rid in mine] == [rid for rid in ids if rid in copies], \
                    f"{context}: out of order"
            again = sum(copies.values()) - len(copies)
            assert not (outage and not replay_killed and again), f"{context}: {again} events came twice"
            answered += len(accepted)
            duplicated += again
    finally:
        proc.kill()
        proc.wait()
        broker.stop()
    print(f"seed {seed}: {answered} answered requests, none lost, {duplicated} events sent twice")

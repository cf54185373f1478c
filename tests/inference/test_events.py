"""Every request and every Feedback call on Kafka: a real broker (Tansu, embedded), the
server's own publisher, and confluent-kafka (librdkafka) as the reader nobody here wrote.

Also: the broker stopped while requests keep coming and started again (a fresh, empty
broker on the same port), and `vigil broker` / `vigil events tail` as a user runs them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource

from eventbus import topics
from eventbus.broker import EmbeddedBroker, api_versions_ok
from inference.api.options import EventOptions
from protos import events_pb2, llm_pb2, llm_pb2_grpc
from tests.helpers.kafka import read_topic
from tests.helpers.serving import PROMPT, TINY, generate, inference_event, kafka_server, metric
from tests.helpers.waiting import wait_until

def by_request(prefix: str):
    needle = prefix.encode()
    return lambda record: needle in record.value()


def flush(server, timeout: float = 30.0) -> None:
    assert server.call(server.server.publisher.flush(timeout)), "the publisher did not empty its queue and outbox"


# -- protobuf (the default) -----------------------------------------------------------


@pytest.fixture(scope="module")
def proto_server(start_server, tiny_llama, tmp_path_factory, kafka_broker):
    return kafka_server(start_server, tiny_llama, tmp_path_factory.mktemp("proto"), kafka_broker.bootstrap_servers)


def test_n_requests_give_n_events_in_order_and_feedback_follows_them(proto_server, kafka_broker):
    tag = f"n-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(proto_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        ordered = [f"{tag}-seq-{i}" for i in range(10)]
        for rid in ordered:  # one after the other: their events must come in this order
            generate(stub, rid)
        with pytest.raises(grpc.RpcError) as bad:
            generate(stub, f"{tag}-bad", prompt="")
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            generate(stub, f"{tag}-missing", model="no-such-model")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        stub.Classify(llm_pb2.ClassifyRequest(model=TINY, text=PROMPT, labels=["dog", "cat"],
                                              request_id=f"{tag}-classify"), timeout=60)
        together = [f"{tag}-par-{i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda rid: generate(stub, rid), together))
        answered = ordered[:3]
        feedback_ids = [stub.Feedback(llm_pb2.FeedbackRequest(request_id=rid, label="good"), timeout=10).feedback_id
                        for rid in answered]
    flush(proto_server)
    sent = ordered + [f"{tag}-bad", f"{tag}-missing", f"{tag}-classify"] + together
    records = read_topic(kafka_broker.bootstrap_servers, topics.INFERENCE, by_request(tag), len(sent))
    events = [inference_event(r) for r in records]
    assert sorted(e.request_id for e in events) == sorted(sent)  # each exactly once

    key = topics.event_key(TINY).encode()
    in_partition = [e.request_id for r, e in zip(records, events) if r.key() == key and e.request_id in ordered]
    assert in_partition == ordered
    by_id = {e.request_id: (r, e) for r, e in zip(records, events)}
    assert by_id[f"{tag}-bad"][1].status == events_pb2.STATUS_INVALID_ARGUMENT
    assert by_id[f"{tag}-missing"][1].status == events_pb2.STATUS_NOT_FOUND
    assert by_id[f"{tag}-missing"][1].route == events_pb2.ROUTE_UNSPECIFIED
    classify = by_id[f"{tag}-classify"][1]
    assert set(classify.label_probabilities) == {"dog", "cat"}
    assert abs(sum(classify.label_probabilities.values()) - 1) < 1e-6

    record, event = by_id[ordered[0]]
    assert (event.model, event.version, event.method) == (TINY, "1", "Generate")
    assert event.status == events_pb2.STATUS_OK and event.route == events_pb2.ROUTE_STABLE
    assert event.completion_tokens == 4 and event.finish_reason == "length"
    assert event.prompt_sha256 == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert event.prompt_chars == len(PROMPT) and event.prompt_tokens > 0
    assert event.completion_chars > 0 and len(event.completion_sha256) == 64
    assert not event.HasField("prompt_text") and not event.HasField("completion_text")  # off by default
    assert event.HasField("confidence") and event.confidence.mean_logprob <= 0
    assert 0 < event.total_seconds and event.first_token_seconds <= event.total_seconds

    headers = dict(record.headers())
    assert headers["ce_specversion"] == b"1.0"
    assert headers["ce_id"].decode() == event.event_id and uuid.UUID(event.event_id)
    assert headers["ce_type"] == b"vigil.events.v1.InferenceEvent"
    assert headers["ce_source"].decode() == event.source and event.source.startswith("vigil-inference/")
    assert headers["content-type"] == b"application/protobuf"
    when = datetime.datetime.fromisoformat(headers["ce_time"].decode().replace("Z", "+00:00"))
    assert abs(when.timestamp() - event.time.ToNanoseconds() / 1e9) < 1e-3

    feedback = read_topic(kafka_broker.bootstrap_servers, topics.FEEDBACK, by_request(tag), len(answered))
    assert len(feedback) == len(answered)
    for r in feedback:
        fb = events_pb2.FeedbackEvent.FromString(r.value())
        assert fb.feedback_id in feedback_ids and fb.label == "good" and (fb.model, fb.version) == (TINY, "1")
        assert dict(r.headers())["ce_type"] == b"vigil.events.v1.FeedbackEvent"
        served = by_id[fb.request_id][0]
        assert (r.key(), r.partition()) == (served.key(), served.partition())  # lands with its event

    assert metric(proto_server.metrics_url, "vigil_events_published_total", topic=topics.INFERENCE) >= len(sent)
    assert metric(proto_server.metrics_url, "vigil_events_broker_connected") == 1
    assert metric(proto_server.metrics_url, "vigil_event_publish_latency_seconds_count", topic=topics.INFERENCE) > 0


def test_topics_are_created_with_partitions_retention_and_compaction(start_server, tiny_llama, tmp_path):
    """On a broker of its own: on the shared one, whichever test's server came first made the topics."""
    with EmbeddedBroker() as broker:
        server = kafka_server(start_server, tiny_llama, tmp_path, broker.bootstrap_servers)
        flush(server)
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers, "log_level": 3})
        described = admin.list_topics(timeout=10).topics
        futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, t)
                                          for t in (topics.ROLLOUT, topics.INFERENCE)])
        configs = {r.name: {k: v.value for k, v in f.result(timeout=10).items()} for r, f in futures.items()}
    assert set(topics.ALL) <= set(described)
    assert len(described[topics.INFERENCE].partitions) == 3
    assert configs[topics.ROLLOUT]["cleanup.policy"] == "compact"
    assert configs[topics.INFERENCE]["cleanup.policy"] == "delete"
    assert configs[topics.INFERENCE]["retention.ms"] == str(EventOptions().topic_retention_ms)


# -- JSON, with the texts -------------------------------------------------------------


def test_json_events_with_text_read_by_a_plain_consumer(start_server, tiny_llama, tmp_path, kafka_broker):
    server = kafka_server(start_server, tiny_llama, tmp_path, kafka_broker.bootstrap_servers,
                          format="json", include_text=True)
    tag = f"json-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        reply = generate(stub, f"{tag}-0")
        stub.Feedback(llm_pb2.FeedbackRequest(request_id=f"{tag}-0", score=0.25, comment="meh"), timeout=10)
    flush(server)
    [record] = read_topic(kafka_broker.bootstrap_servers, topics.INFERENCE, by_request(tag), 1)
    assert dict(record.headers())["content-type"] == b"application/json"
    event = json.loads(record.value())
    assert event["request_id"] == f"{tag}-0" and event["status"] == "STATUS_OK" and event["route"] == "ROUTE_STABLE"
    assert event["prompt_text"] == PROMPT and event["completion_text"] == reply.text
    assert event["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert event["completion_sha256"] == hashlib.sha256(reply.text.encode()).hexdigest()
    assert event["completion_tokens"] == 4 and event["model"] == TINY
    assert set(event["confidence"]) == {"mean_logprob", "mean_entropy", "min_top1_prob"}
    datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
    [fb] = read_topic(kafka_broker.bootstrap_servers, topics.FEEDBACK, by_request(tag), 1)
    feedback = json.loads(fb.value())
    assert (feedback["request_id"], feedback["score"], feedback["comment"]) == (f"{tag}-0", 0.25, "meh")
    assert "label" not in feedback


# -- the broker goes away and comes back ----------------------------------------------


def test_broker_outage_loses_nothing_and_keeps_order(start_server, tiny_llama, tmp_path):
    broker = EmbeddedBroker().start()
    try:
        server = kafka_server(start_server, tiny_llama, tmp_path, broker.bootstrap_servers)
        tag = f"outage-{uuid.uuid4().hex[:8]}"
        url = server.metrics_url
        with grpc.insecure_channel(server.address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            generate(stub, f"{tag}-before")
            flush(server)
            broker.kill()
            during, slowest = [f"{tag}-during-{i}" for i in range(24)], 0.0
            for rid in during:
                started = time.monotonic()
                generate(stub, rid)
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.05)  # the outage lasts past the publish timeout (1 s)
            deadline = time.monotonic() + 20
            while metric(url, "vigil_outbox_bytes") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert metric(url, "vigil_events_spilled_total", topic=topics.INFERENCE) > 0
            assert metric(url, "vigil_outbox_bytes") > 0 and metric(url, "vigil_events_broker_connected") == 0
            assert slowest < 5, "a request waited for the broker"
            broker.start()  # a fresh, empty broker on the same port
            flush(server, 60)
        records = read_topic(broker.bootstrap_servers, topics.INFERENCE, by_request(f"{tag}-during"), len(during))
        got = [inference_event(r).request_id for r in records]
        assert sorted(got) == sorted(during)  # every one, once
        assert got == during  # in order: they share a key
        assert metric(url, "vigil_events_replayed_total", topic=topics.INFERENCE) > 0
        assert metric(url, "vigil_outbox_bytes") == 0
        assert metric(url, "vigil_events_failed_total", topic=topics.INFERENCE, reason="queue_full") == 0
    finally:
        broker.stop()


def test_broker_connected_falls_at_once_when_the_broker_dies(start_server, tiny_llama, tmp_path):
    """Not after a publish timeout (30 s here): when the connection breaks and no broker
    answers a metadata request. Idle or busy; and it rises again with a new broker."""
    broker = EmbeddedBroker().start()
    try:
        server = kafka_server(start_server, tiny_llama, tmp_path, broker.bootstrap_servers, publish_timeout_ms=30_000)
        url = server.metrics_url
        with grpc.insecure_channel(server.address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            for busy in (False, True):
                generate(stub, f"connected-{uuid.uuid4().hex[:8]}")
                flush(server)
                assert metric(url, "vigil_events_broker_connected") == 1
                broker.kill()
                if busy:
                    generate(stub, f"connected-{uuid.uuid4().hex[:8]}")
                wait_until(lambda: metric(url, "vigil_events_broker_connected") == 0, 3,
                           f"still connected 3 s after the broker died ({'busy' if busy else 'idle'})")
                broker.start()
                wait_until(lambda: metric(url, "vigil_events_broker_connected") == 1, 20, "never reconnected")
            flush(server)
        assert metric(url, "vigil_events_failed_total") == 0
    finally:
        broker.stop()


# -- the commands ---------------------------------------------------------------------

VIGIL = [sys.executable, "-m", "vigil.cli"]


def test_vigil_broker_runs_tansu_and_stops_on_sigterm():
    proc = subprocess.Popen([*VIGIL, "broker", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"Kafka protocol on ([\d.]+):(\d+)", line)
        assert match, line
        assert api_versions_ok(match.group(1), int(match.group(2)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not api_versions_ok(match.group(1), int(match.group(2)))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_vigil_events_tail_prints_decoded_events(proto_server, kafka_broker):
    tag = f"tail-{uuid.uuid4().hex[:8]}"
    with grpc.insecure_channel(proto_server.address) as channel:
        stub = llm_pb2_grpc.LLMStub(channel)
        for i in range(3):
            generate(stub, f"{tag}-{i}")
    flush(proto_server)
    base = [*VIGIL, "events", "tail", "--bootstrap-servers", kafka_broker.bootstrap_servers,
            "--topic", topics.INFERENCE, "--from-beginning", "--idle-timeout", "3"]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    mine = [r for r in lines if r["event"]["request_id"].startswith(tag)]
    assert [r["event"]["request_id"] for r in mine] == [f"{tag}-{i}" for i in range(3)]
    assert mine[0]["key"] == TINY and mine[0]["ce"]["type"] == "vigil.events.v1.InferenceEvent"
    assert mine[0]["event"]["status"] == "STATUS_OK" and mine[0]["topic"] == topics.INFERENCE

    plain = subprocess.run([*base, "--max-events", "1"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stderr
    assert re.match(r"\S+Z vigil\.inference\.events/\d+@\d+ \S+ \{", plain.stdout)

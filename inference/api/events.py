"""Where the server hands its events: one per request and one per Feedback call.

Serving builds each event as a dict; `to_message` turns it into the protobuf message
that goes on Kafka (protos/events.proto). `publish` must return at once, and is called
before the request is answered: the Kafka publisher (eventbus.publisher.Publisher) writes
the event to its on-disk outbox before it returns, and sends it in the background.
`MemorySink` keeps the latest events in process, for tests and for a server run
without a broker.
"""

from __future__ import annotations

import collections
import hashlib
import threading
from typing import Callable, Protocol

from eventbus import topics
from protos import events_pb2

INFERENCE_TOPIC = topics.INFERENCE
FEEDBACK_TOPIC = topics.FEEDBACK


class EventSink(Protocol):
    # on_done (None unless the request is traced): called once with "" when the event is
    # delivered, else with what became of it ("outbox", or why it was lost)
    def publish(self, topic: str, key: str, event: dict,
                on_done: Callable[[str], None] | None = None) -> None: ...


class MemorySink:
    def __init__(self, capacity: int = 10_000):
        self.records: collections.deque[tuple[str, str, dict]] = collections.deque(maxlen=capacity)
        self.lock = threading.Lock()

    def publish(self, topic: str, key: str, event: dict, on_done: Callable[[str], None] | None = None) -> None:
        with self.lock:
            self.records.append((topic, key, event))
        if on_done is not None:
            on_done("")

    def events(self, topic: str | None = None) -> list[dict]:
        with self.lock:
            return [e for t, _, e in self.records if topic is None or t == topic]


STATUS = {
    "ok": events_pb2.STATUS_OK,
    "invalid_argument": events_pb2.STATUS_INVALID_ARGUMENT,
    "not_found": events_pb2.STATUS_NOT_FOUND,
    "resource_exhausted": events_pb2.STATUS_RESOURCE_EXHAUSTED,
    "cancelled": events_pb2.STATUS_CANCELLED,
    "deadline_exceeded": events_pb2.STATUS_DEADLINE_EXCEEDED,
    "internal": events_pb2.STATUS_INTERNAL,
}
ROUTE = {
    "stable": events_pb2.ROUTE_STABLE,
    "canary": events_pb2.ROUTE_CANARY,
    "shadow": events_pb2.ROUTE_SHADOW,
    "pinned": events_pb2.ROUTE_PINNED,
}


class TokenHasher:
    """Keyed 32-bit hashes of token ids (BLAKE2b), for InferenceEvent.completion_token_hashes:
    equal ids give equal hashes, which is all distinct-n needs. With an empty key anyone
    holding the tokenizer can read them back; every server of a deployment needs the same key."""

    def __init__(self, key: bytes = b""):
        self.key = key
        self.memo: dict[int, int] = {}

    def __call__(self, token_ids) -> list[int]:
        memo = self.memo
        out = []
        for t in token_ids:
            h = memo.get(t)
            if h is None:
                h = memo[t] = int.from_bytes(
                    hashlib.blake2b(t.to_bytes(4, "little"), digest_size=4, key=self.key).digest(), "little")
            out.append(h)
        return out


def to_message(topic: str, event: dict):
    if topic == INFERENCE_TOPIC:
        return inference_event(event)
    if topic == FEEDBACK_TOPIC:
        return feedback_event(event)
    raise ValueError(f"no event type for topic {topic!r}")


def inference_event(e: dict) -> events_pb2.InferenceEvent:
    m = events_pb2.InferenceEvent(
        event_id=e["event_id"], source=e["source"], request_id=e["request_id"], method=e["method"],
        model=e["model"], version=e["version"], route=ROUTE.get(e["route"], events_pb2.ROUTE_UNSPECIFIED),
        status=STATUS.get(e["status"], events_pb2.STATUS_UNSPECIFIED), error=e["error"],
        prompt_chars=e["prompt_chars"], prompt_sha256=e["prompt_sha256"], prompt_tokens=e["prompt_tokens"],
        completion_chars=e.get("completion_chars", 0), completion_sha256=e.get("completion_sha256", ""),
        completion_tokens=e["completion_tokens"], finish_reason=e["finish_reason"],
        queue_seconds=e["queue_seconds"], first_token_seconds=e["first_token_seconds"],
        total_seconds=e["total_seconds"], tenant=e.get("tenant", ""), trace_id=e.get("trace_id", ""),
        flags=e.get("flags", ()), shadow_of=e.get("shadow_of", ""),
        completion_token_hashes=e.get("completion_token_hashes", ()))
    m.time.FromNanoseconds(int(e["time"] * 1e9))
    if e.get("mean_logprob") is not None:
        m.confidence.mean_logprob = e["mean_logprob"]
        m.confidence.mean_entropy = e["mean_entropy"]
        m.confidence.min_top1_prob = e["min_top1_prob"]
    if e.get("label_probabilities"):
        m.label_probabilities.update(e["label_probabilities"])
    if e.get("prompt_text") is not None:
        m.prompt_text = e["prompt_text"]
    if e.get("completion_text") is not None:
        m.completion_text = e["completion_text"]
    return m


def feedback_event(e: dict) -> events_pb2.FeedbackEvent:
    m = events_pb2.FeedbackEvent(event_id=e["feedback_id"], source=e.get("source", ""),
                                 feedback_id=e["feedback_id"], request_id=e["request_id"],
                                 model=e["model"], version=e["version"], comment=e.get("comment", ""))
    m.time.FromNanoseconds(int(e["time"] * 1e9))
    if e.get("label") is not None:
        m.label = e["label"]
    elif e.get("score") is not None:
        m.score = e["score"]
    return m

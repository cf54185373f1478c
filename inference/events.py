"""Where the server hands its events: one per request and one per Feedback call.

`publish` must return at once; a sink that talks to a broker queues and sends in the
background. `MemorySink` keeps the latest events in process, for tests and for a
server run without a broker.
"""

from __future__ import annotations

import collections
import threading
from typing import Protocol

INFERENCE_TOPIC = "vigil.inference.events"
FEEDBACK_TOPIC = "vigil.feedback"


class EventSink(Protocol):
    def publish(self, topic: str, key: str, event: dict) -> None: ...


class MemorySink:
    def __init__(self, capacity: int = 10_000):
        self.records: collections.deque[tuple[str, str, dict]] = collections.deque(maxlen=capacity)
        self.lock = threading.Lock()

    def publish(self, topic: str, key: str, event: dict) -> None:
        with self.lock:
            self.records.append((topic, key, event))

    def events(self, topic: str | None = None) -> list[dict]:
        with self.lock:
            return [e for t, _, e in self.records if topic is None or t == topic]

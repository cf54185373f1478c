"""Shared fixtures: the demo model, a tiny random Llama saved as a Hugging Face folder,
and inference servers running on loopback in a thread of their own."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from inference.runtime.demo import demo_model_path
from inference.api.events import MemorySink
from inference.api.options import ServerOptions
from inference.api.server import InferenceServer
from tests.helpers.models import make_tiny_llama


@pytest.fixture(scope="session")
def demo_gguf() -> Path:
    return demo_model_path()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class ServerThread:
    """An InferenceServer on loopback, in a thread with its own event loop. Its events go
    to a MemorySink, or to Kafka where options.events names bootstrap servers (then
    `sink` is the server's Publisher)."""

    def __init__(self, options: ServerOptions):
        self.server = InferenceServer(options, sink=None if options.events.bootstrap_servers else MemorySink())
        self.sink = self.server.sink
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self) -> None:
        self.call(self.server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="session")
def start_server():
    """start_server(model=..., **options) -> ServerThread; stopped at the end of the session."""
    started = []

    def start(**options) -> ServerThread:
        options.setdefault("port", 0)
        options.setdefault("metrics_port", 0)
        s = ServerThread(ServerOptions(**options))
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def kafka_broker():
    """The embedded Kafka-compatible broker (Tansu), on a free loopback port. Tests that
    stop or restart a broker start their own."""
    from eventbus import topics
    from eventbus.broker import EmbeddedBroker
    from eventbus.kafka import Kafka

    with EmbeddedBroker() as broker:
        # the same topics whichever test comes first (a server would make them with its own partitions)
        asyncio.run(Kafka(broker.bootstrap_servers).ensure_topics("vigil-tests", topics.ALL,
                                                                   topics.TopicOptions(partitions=3)))
        yield broker


@pytest.fixture(scope="session")
def demo_server(start_server, demo_gguf) -> ServerThread:
    """The demo model, served as in `vigil up` (int4 weights taken over from Q4_1)."""
    return start_server(model="demo")


@pytest.fixture
def restore_logging():
    """The root logger's handlers and level, and the components' levels, as they were
    before a test that runs `vigil` (which sets logging up) changed them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    named = {n: logging.getLogger(n).level for n in ("inference", "eventbus", "aiokafka", "inference.requests",
                                                      "stream_processors", "alerting")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for n, lvl in named.items():
        logging.getLogger(n).setLevel(lvl)

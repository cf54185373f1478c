"""A `vigil rollout` service in a thread of the test's own, with its admin API client, and
the stream processor whose comparisons of candidate and stable it decides on."""

from __future__ import annotations

import asyncio
import threading

from rollout.cli import HttpApi
from rollout.service import RolloutService, ServiceOptions
from stream_processors.runner import Runner
from stream_processors.settings import RunnerOptions, Settings

# comparisons of a candidate with stable every 5 of its events, over its latest 60 and
# from 10 a side: what a rollout of a dozen requests a step needs
FAST_COMPARISONS = Settings(compare_every=5, compare_min=10, compare_window=60)


class ServiceThread:
    def __init__(self, bootstrap: str, group: str, tmp_path, name: str, **options):
        """`options`: more of ServiceOptions (a response policy, say)."""
        self.service = RolloutService(ServiceOptions(
            bootstrap_servers=bootstrap, admin_port=0, group_id=group, tick=0.25, instance=name,
            session_timeout_ms=6000, outbox_dir=str(tmp_path / f"outbox-{name}"), **options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.service.start())
        self.api = HttpApi(f"http://127.0.0.1:{self.service.admin_port}")
        self.stopped = False

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.call(self.service.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class ProcessorThread:
    """`vigil process` (its runner) in a thread of the test's own, in a consumer group of its own."""

    def __init__(self, bootstrap: str, group: str, settings: Settings = FAST_COMPARISONS):
        self.runner = Runner(RunnerOptions(bootstrap_servers=bootstrap, group_id=group, metrics_port=-1,
                                           checkpoint_interval=1.0, session_timeout_ms=6000, settings=settings))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.start(), self.loop).result(60)
        self.task = asyncio.run_coroutine_threadsafe(self.runner.run(), self.loop)

    def stop(self):
        self.loop.call_soon_threadsafe(self.runner.stopping.set)
        self.task.result(30)
        asyncio.run_coroutine_threadsafe(self.runner.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

"""A `vigil rollout` service in a thread of the test's own, with its admin API client."""

from __future__ import annotations

import asyncio
import threading

from rollout.cli import HttpApi
from rollout.service import RolloutService, ServiceOptions


class ServiceThread:
    def __init__(self, bootstrap: str, group: str, tmp_path, name: str):
        self.service = RolloutService(ServiceOptions(
            bootstrap_servers=bootstrap, admin_port=0, group_id=group, tick=0.25, instance=name,
            session_timeout_ms=6000, outbox_dir=str(tmp_path / f"outbox-{name}")))
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

"""A webhook receiver on loopback that records what it gets, checks signatures, and can
be told to fail, hang or slow down; and a signal factory."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

from eventbus.service import listen

from alerting.signals import Signal
from eventbus.signing import SIGNATURE_HEADER, verify

WEBHOOK_V4_FIELDS = ("receiver", "status", "alerts", "groupLabels", "commonLabels", "commonAnnotations",
                     "externalURL", "version", "groupKey", "truncatedAlerts")
ALERT_V4_FIELDS = ("status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint")


@dataclass
class Received:
    path: str
    body: bytes
    headers: dict
    at: float  # time.time() when it arrived
    mono: float  # time.perf_counter() when it arrived
    signature_ok: bool | None

    @property
    def json(self):
        return json.loads(self.body)


@dataclass
class WebhookRecorder:
    secret: bytes | None = None
    fail_with: int = 0  # answer this status instead of 200 while > 0
    delay: float = 0.0  # wait this long before answering
    received: list[Received] = field(default_factory=list)
    attempts: int = 0
    host: str = "127.0.0.1"
    port: int = 0

    def __post_init__(self):
        self.app = web.Application()
        self.app.router.add_post("/{tail:.*}", self._handle)
        self._runner = None
        self.event = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_with:
            return web.Response(status=self.fail_with, text="failing on purpose")
        sig = verify(self.secret, body, request.headers.get(SIGNATURE_HEADER)) if self.secret else None
        self.received.append(Received(request.path, body, dict(request.headers), time.time(), time.perf_counter(), sig))
        self.event.set()
        return web.Response(text="ok")

    async def start(self) -> "WebhookRecorder":
        self._runner, self.port = await listen(self.app, self.host, self.port, "the webhook receiver")
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            self.event.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.received)} of {n} webhooks arrived in {timeout}s")
            try:
                await asyncio.wait_for(self.event.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.received


def drift_signal(model="smollm2", version="v1", feature="latency", detector="ks", drifted=True,
                 statistic=0.4, p_value=0.001, t=None) -> Signal:
    return Signal(detector=detector, feature=feature, model=model, version=version, statistic=statistic,
                  drifted=drifted, time=time.time() if t is None else t, p_value=p_value,
                  reference_size=500, window_size=200)

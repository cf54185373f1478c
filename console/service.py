"""`vigil ui` running: the reader fills the model, each change goes to the open pages at
once, request figures once a second, and the HTTP app serves them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from eventbus.service import listen
from eventbus.security import NONE as NO_SECURITY
from eventbus.security import KafkaSecurity
from eventbus.supervise import Supervisor

from .app import Hub, make_app
from .model import Caps, Model
from .peers import Actions, Silences
from .reader import Reader

TRAFFIC_EVERY_S = 1.0


@dataclass
class Options:
    bootstrap_servers: str = "127.0.0.1:9092"
    host: str = "127.0.0.1"
    port: int = 8005
    backlog: int = 2000
    caps: Caps = field(default_factory=Caps)
    security: KafkaSecurity = NO_SECURITY
    rollout_url: str = ""     # the rollout controller's admin API: the operator's actions go there
    alerting_url: str = ""    # alerting's (or Alertmanager's) API: which alerts are silenced
    auth_keys: str = ""       # key file: actions need an admin key
    silences_every: float = 2.0


class Console:
    def __init__(self, options: Options):
        self.options = options
        self.model = Model(options.caps)
        self.hub = Hub()
        self.reader = Reader(options.bootstrap_servers, self._apply, options.backlog, options.security)
        self.actions = Actions(options.rollout_url, options.auth_keys)
        self.tasks = Supervisor()
        self.runner: web.AppRunner | None = None
        self.port = options.port

    @property
    def url(self) -> str:
        return f"http://{self.options.host}:{self.port}/"

    def state(self) -> dict:
        return {**self.model.snapshot(), "following": self.reader.following, "undecodable": self.reader.undecodable,
                "down": self.tasks.down(), "actions": self.actions.describe(),
                "alerting_url": self.options.alerting_url}

    def _apply(self, message, record_time: float) -> None:
        change = self.model.apply(message, record_time)
        if change is not None:
            self.hub.publish(change)

    def _silences(self, silenced: dict, silences: list, error: str | None) -> None:
        for a in self.model.set_silences(silenced, silences, error):
            self.hub.publish({"type": "alert", "alert": a})
        self.hub.publish({"type": "silences", "silences": silences, "error": error})

    async def _traffic(self) -> None:
        while True:
            await asyncio.sleep(TRAFFIC_EVERY_S)
            change = self.model.take_traffic(time.time())
            if change is not None:
                self.hub.publish(change)

    async def start(self) -> None:
        o = self.options
        self.runner, self.port = await listen(make_app(self.state, self.hub, self.actions), o.host, o.port, "--port")
        await self.reader.start()
        self.tasks.start("read", self.reader.run)
        self.tasks.start("traffic", self._traffic)
        if o.alerting_url:
            self.tasks.start("silences", Silences(o.alerting_url, self._silences, o.silences_every).run)

    async def stop(self) -> None:
        await self.tasks.stop()
        await self.reader.stop()
        self.hub.close()
        if self.runner is not None:
            await self.runner.cleanup()

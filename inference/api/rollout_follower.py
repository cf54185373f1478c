"""The server side of rollouts: follow vigil.rollout and serve what it says.

At start the follower reads the compacted topic to its end and applies the latest
RolloutState of each model it serves, before the server takes requests; then it applies
each new record as it comes. If the broker does not answer, the server serves with its
local weights and the follower keeps trying in the background. A record is applied with
Router.set_rollout, in one call on the server's event loop, so a request is routed either
by the old state or by the new one, never by a mix.

A record may name versions this server has not loaded (the record carries no source to
load them from): they are left out, with a warning, and the remaining weights are used
(all traffic on the loaded versions); if no loaded version keeps a positive weight the
record is skipped. The latest record per model is kept, and applied again when the set of
loaded versions changes (a version loaded later through the admin API gets its share).
The record's stable version, its shadow versions (those loaded here) and its feature
flags are applied in the same call as the weights, and with them each loaded version's
temperature for its label probabilities (1, none, where the record names none); a
record the router refuses (a negative or infinite weight) is logged and skipped.

Its tasks (following the topic, watching the loaded versions, retrying an unreadable
broker) run under the server's eventbus.supervise.Supervisor, which the server's health
follows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math

from aiokafka.errors import KafkaError

from eventbus import topics
from eventbus.consumer import Received, TopicMissing
from eventbus.flags import Flag, FlagError
from eventbus.publisher import describe
from eventbus.security import NONE as NO_SECURITY, KafkaSecurity
from eventbus.state import TopicReader
from eventbus.supervise import Supervisor
from inference.api.router import Router

log = logging.getLogger(__name__)


class RolloutFollower:
    def __init__(self, router: Router, bootstrap_servers: str, topic: str = topics.ROLLOUT,
                 recheck: float = 0.5, security: KafkaSecurity = NO_SECURITY, tasks: Supervisor | None = None):
        self.router = router
        self.reader = TopicReader(bootstrap_servers, topic, client_id="vigil-inference-rollout",
                                  security=security)
        self.recheck = recheck
        self.desired: dict[str, object] = {}      # model -> latest RolloutState
        self.applied: dict[str, tuple] = {}       # model -> (generation, loaded versions) last applied
        self.warned: set[tuple[str, str]] = set()
        self.tasks = tasks if tasks is not None else Supervisor()

    async def start(self, timeout: float = 10.0) -> None:
        """Apply the latest state before the server takes requests, if the broker answers
        within `timeout`; otherwise serve with the local weights and keep trying in the
        background (a broker that is down must not keep a server from serving)."""
        try:
            records = await asyncio.wait_for(self.reader.start(), timeout)
        except (KafkaError, TopicMissing, asyncio.TimeoutError) as exc:
            log.warning("%s not readable (%s): serving with local weights until it is", self.reader.topic,
                        describe(exc))
            await self.reader.stop()
            self.tasks.start("rollout-retry", self.retry)
            return
        self.begin(records)

    async def retry(self, every: float = 2.0) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                records = await self.reader.start()
            except (KafkaError, TopicMissing):
                await self.reader.stop()
                continue
            log.info("%s readable again: following it", self.reader.topic)
            self.begin(records)
            return

    def begin(self, records: list[Received]) -> None:
        latest: dict[str, object] = {}
        for r in records:
            if r.message is not None and r.message.model:
                latest[r.message.model] = r.message  # log order: later records win
        for msg in latest.values():
            self.take(msg)
        self.tasks.start("rollout-follow", lambda: self.reader.follow(self.on_record))
        self.tasks.start("rollout-versions", self.watch_versions)

    async def stop(self) -> None:
        await self.tasks.stop("rollout-retry", "rollout-follow", "rollout-versions")
        await self.reader.stop()

    def on_record(self, r: Received) -> None:
        if r.message is None:
            log.warning("vigil.rollout %d@%d undecodable: %s", r.partition, r.offset, r.error)
        elif r.message.model:
            self.take(r.message)

    def take(self, msg) -> None:
        self.desired[msg.model] = msg
        self.apply(msg.model)

    async def watch_versions(self) -> None:
        while True:
            await asyncio.sleep(self.recheck)
            for model in list(self.desired):
                if self.applied.get(model, (None, None))[1] != self.loaded(model):
                    self.apply(model)

    def loaded(self, model: str) -> tuple:
        return tuple(sorted(self.router.versions.get(model, {})))

    def apply(self, model: str) -> dict[str, float] | None:
        msg = self.desired[model]
        loaded = self.loaded(model)
        self.applied[model] = (msg.generation, loaded)
        if not loaded:
            return None  # not served here
        weights = {vw.version: vw.weight for vw in msg.weights if self.present(model, vw.version, loaded)}
        shadows = [v for v in msg.shadow_versions if self.present(model, v, loaded)]
        total = sum(weights.values())
        if not total > 0:  # also NaN
            log.warning("rollout of %s generation %d gives no traffic to a loaded version (%s); not applied",
                        model, msg.generation, ", ".join(loaded))
            return None
        try:
            new = self.router.set_rollout(model, {v: w / total for v, w in weights.items()}, shadows,
                                          flags(msg), stable=msg.stable_version)
        except ValueError as exc:  # a negative or infinite weight, which Router.set_weights names
            log.warning("rollout of %s generation %d not applied: %s", model, msg.generation, exc)
            return None
        for version, mv in self.router.versions[model].items():
            t = msg.temperatures.get(version, 1.0)
            mv.temperature = t if math.isfinite(t) and t > 0 else 1.0
        log.info("rollout of %s generation %d: weights %s%s (%s)", model, msg.generation,
                 ", ".join(f"{v} {w:.0%}" for v, w in sorted(new.items())),
                 f"; shadow {', '.join(shadows)}" if shadows else "", msg.reason)
        return new

    def present(self, model: str, version: str, loaded: tuple) -> bool:
        if version in loaded:
            return True
        if (model, version) not in self.warned:
            self.warned.add((model, version))
            log.warning("rollout of %s names version %s, which this server has not loaded; "
                        "it is left out here", model, version)
        return False


def flags(msg) -> dict[str, Flag]:
    """The record's feature flags; a flag that does not parse is left out, with a warning."""
    if not msg.flags_json:
        return {}
    try:
        raw = json.loads(msg.flags_json)
    except (ValueError, RecursionError) as exc:
        log.warning("rollout of %s generation %d: flags_json is not JSON (%s); no flags applied",
                    msg.model, msg.generation, exc)
        return {}
    parsed = {}
    for name, d in raw.items() if isinstance(raw, dict) else ():
        try:
            parsed[name] = Flag.from_dict(d)
        except (FlagError, TypeError, AttributeError) as exc:
            log.warning("rollout of %s generation %d: flag %s left out: %s", msg.model, msg.generation, name, exc)
    return parsed

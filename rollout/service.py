"""`vigil rollout`: the controller as a service on Kafka.

- Observations: vigil.signals (the processors' comparisons of candidate and stable, drift)
  and vigil.alerts, every partition from the end (no consumer group), into
  Controller.observe. No raw events: the processors own every statistic.
- Time: Controller.tick() every `tick` seconds.
- Decisions: every change of a model's state (a command, an analysis, an alert, a model
  first seen) is published on vigil.rollout as a RolloutState keyed by the model, with the
  model's whole controller state in it.
- Leadership: every instance joins one consumer group on the single-partition topic
  vigil.rollout.lease; the instance that holds partition 0 is the leader and the only one
  that observes, ticks, takes commands and publishes. On becoming leader it reads
  vigil.rollout to its end and resumes with Controller.from_records, so a restarted
  controller, or a standby taking over, goes on from the last decision. On losing the
  partition (or stopping) it flushes its decisions first, so the next leader reads them.
  Observations between the last decision and a takeover are not seen by the new leader;
  a step's window then restarts from what was recorded.
- Admin API (aiohttp) on --admin-port: POST /api/<op> with the arguments as a JSON object
  (ops of rollout.cli.OPS; `start` also registers the candidate, and the model with
  `stable` when no event of it has been seen); GET /healthz; GET /metrics. A request is
  checked whole before anything changes: a bad one answers 400 with the field it names,
  and changes and publishes nothing. A standby answers 503 naming itself.
- Tasks: the lease, the observer and the tick run under an eventbus.supervise.Supervisor;
  while one waits to be restarted after a failure, /healthz answers 503 naming it.
- Response policy (--policy, policy.py): loaded at start (a bad file stops the start) and
  again on SIGHUP (`reload_policy`; a bad file is logged, every error named, and the last
  good policy kept). The controller's actions go to vigil.actions (an Action keyed by the
  action's id, compacted), counted in vigil_rollout_actions_total{action,outcome}; on
  becoming leader the instance reads vigil.actions back, so no alert instance is acted on
  twice by a rule, whatever restarts. A retrain is sent here: its Action is published
  "pending" first (at most once, even if this instance dies while sending), then "sent" or
  "failed"; the request is a signed webhook (eventbus/signing.py, the scheme alerting
  uses) with a manifest naming the model, version, alerts, signals and the offset ranges
  of vigil.inference.events and vigil.feedback since the drift began (`data_ranges`: the
  first offset at or after that time per partition, from ListOffsets by time, to the end
  found as eventbus.state.seek_to_end finds it; the records are not read).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from prometheus_client import CollectorRegistry, Counter, Gauge

from eventbus import compat, service, topics
from eventbus.consumer import decode
from eventbus.signing import SIGNATURE_HEADER, sign
from eventbus.yamlpos import FileErrors
from eventbus.kafka import Kafka
from eventbus.publisher import Publisher, PublisherOptions
from eventbus.security import KafkaSecurity
from eventbus.state import TopicReader, seek_to_end, stop_consumer
from eventbus.supervise import Supervisor

from . import policy as pol
from . import wire
from .api import LocalApi, plain
from .config import RolloutConfig
from .controller import Controller
from .records import PHASES, ActionRecord, RolloutError

log = logging.getLogger("vigil.rollout")
compat.install()

LEASE_TOPIC = "vigil.rollout.lease"
OBSERVED = (topics.SIGNALS, topics.ALERTS)


@dataclass
class ServiceOptions:
    bootstrap_servers: str = "127.0.0.1:9092"
    host: str = "127.0.0.1"
    admin_port: int = 8004          # 0: any free port
    group_id: str = "vigil-rollout"
    tick: float = 1.0               # seconds between Controller.tick() calls
    session_timeout_ms: int = 6000  # a leader that vanishes is replaced after about this long
    outbox_dir: str = ""            # empty: <cache_dir>/outbox/rollout-<instance>
    cache_dir: str = ""             # empty: ~/.vigil (vigil passes its cache folder)
    instance: str = ""              # empty: <host>-<pid>
    defaults: RolloutConfig = field(default_factory=RolloutConfig)
    security: KafkaSecurity = field(default_factory=KafkaSecurity)  # SASL and TLS (repr hides passwords)
    policy: str = ""                # response policy file; empty: none
    policy_dry_run: bool = False    # record the policy's actions as "dry-run", take none


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.leader = Gauge("vigil_rollout_leader", "1 while this instance decides", registry=r)
        self.decisions = Counter("vigil_rollout_decisions_total", "decisions published", ["model", "phase"],
                                 registry=r)
        self.observations = Counter("vigil_rollout_observations_total", "records observed", ["topic"], registry=r)
        self.weight = Gauge("vigil_rollout_weight", "desired traffic share", ["model", "version"], registry=r)
        self.step = Gauge("vigil_rollout_step", "canary step index", ["model"], registry=r)
        self.phase = Gauge("vigil_rollout_phase", "1 for the model's current phase, 0 for the others",
                           ["model", "phase"], registry=r)
        self.actions = Counter("vigil_rollout_actions_total", "response policy actions recorded",
                               ["action", "outcome"], registry=r)
        self.policy_rules = Gauge("vigil_rollout_policy_rules", "rules of the response policy in force", registry=r)
        self.policy_reloads = Counter("vigil_rollout_policy_reloads_total", "response policy reloads",
                                      ["result"], registry=r)


class RolloutService:
    def __init__(self, options: ServiceOptions):
        o = self.options = options
        self.instance = o.instance or f"{socket.gethostname()}-{os.getpid()}"
        self.kafka = Kafka(o.bootstrap_servers, o.security)
        self.metrics = Metrics()
        self.controller: Controller | None = None  # only while leader
        self.suspended: Controller | None = None   # ours before a rebalance took the lease away
        self.published: dict[str, int] = {}        # model -> last generation published
        self.publisher: Publisher | None = None
        self.lease: AIOKafkaConsumer | None = None
        self.observer: AIOKafkaConsumer | None = None
        self.tasks = Supervisor(self.metrics.registry)
        self.lock = asyncio.Lock()
        self.runner: web.AppRunner | None = None
        self.admin_port = 0
        self.became_leader = asyncio.Event()
        self.policy = pol.load_policy(o.policy) if o.policy else pol.EMPTY
        self.metrics.policy_rules.set(len(self.policy))
        self.sending: set[asyncio.Task] = set()

    def reload_policy(self) -> bool:
        """Load the policy file again (SIGHUP); a file with errors is logged and the
        policy in force kept. Returns whether the new one is in force."""
        path = self.options.policy
        if not path:
            return False
        try:
            new = pol.load_policy(path)
        except FileErrors as e:
            self.metrics.policy_reloads.labels("error").inc()
            log.error("response policy %s not reloaded, keeping the %d rules in force:\n%s", path,
                      len(self.policy), e)
            return False
        self.policy = new
        if self.controller is not None:
            self.controller.set_policy(new)
        self.metrics.policy_reloads.labels("ok").inc()
        self.metrics.policy_rules.set(len(new))
        log.info("response policy %s reloaded: %d rules", path, len(new))
        return True
    @property
    def leader(self) -> bool:
        return self.controller is not None

    # ---- life -----------------------------------------------------------------------

    async def start(self) -> None:
        o = self.options
        if not o.outbox_dir:
            o.outbox_dir = str(Path(o.cache_dir or "~/.vigil").expanduser() / "outbox" / f"rollout-{self.instance}")
        self.publisher = Publisher(PublisherOptions(
            bootstrap_servers=o.bootstrap_servers, outbox_dir=o.outbox_dir, source=f"vigil-rollout/{self.instance}",
            client_id="vigil-rollout", publish_timeout_ms=3000, security=o.security))
        await self.publisher.start()
        await self.kafka.ensure_topics("vigil-rollout", [LEASE_TOPIC], topics.TopicOptions(partitions=1))
        await self.kafka.ensure_topics("vigil-rollout", [topics.ACTIONS])
        self.observer = self.kafka.consumer(f"vigil-rollout-{self.instance}")
        await self.observer.start()
        tps = []
        for t in OBSERVED:
            tps += await self.kafka.partitions(self.observer, t, 10.0)
        self.observer.assign(tps)
        self.observer.pause(*tps)  # read only while leader
        await self._serve_admin()
        self.lease = self.kafka.consumer(
            f"vigil-rollout-lease-{self.instance}", group_id=o.group_id, session_timeout_ms=o.session_timeout_ms,
            heartbeat_interval_ms=max(100, o.session_timeout_ms // 10), rebalance_timeout_ms=3000,
            max_poll_interval_ms=max(10000, o.session_timeout_ms * 2))
        self.lease.subscribe([LEASE_TOPIC], listener=_Lease(self))
        await self.lease.start()
        self.tasks.start("rollout-lease", self._poll_lease)
        self.tasks.start("rollout-observe", self._observe)
        self.tasks.start("rollout-tick", self._tick)
        log.info("vigil rollout %s: admin API on http://%s:%d, waiting for the lease on %s",
                 self.instance, o.host, self.admin_port, LEASE_TOPIC)

    async def stop(self) -> None:
        for t in list(self.sending):
            t.cancel()
        await asyncio.gather(*self.sending, return_exceptions=True)
        await self.tasks.stop()
        await self._step_down("stopping")
        if self.lease is not None:
            await stop_consumer(self.lease)  # leaves the group: a standby takes over at once
        if self.observer is not None:
            await stop_consumer(self.observer)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.publisher is not None:
            await self.publisher.stop()

    async def _poll_lease(self) -> None:
        while True:  # nothing is written there; polling keeps the membership alive
            await self.lease.getmany(timeout_ms=500)

    # ---- leadership -----------------------------------------------------------------

    async def _take_over(self) -> None:
        async with self.lock:
            if self.leader:
                return
            reader = TopicReader(self.options.bootstrap_servers, topics.ROLLOUT, client_id="vigil-rollout-resume",
                                 security=self.options.security)
            try:
                records = [wire.decision_dict(r.message) for r in await reader.start() if r.message is not None]
            finally:
                await reader.stop()
            reader = TopicReader(self.options.bootstrap_servers, topics.ACTIONS, client_id="vigil-rollout-actions",
                                 security=self.options.security)
            try:
                done = [wire.action_record(r.message) for r in await reader.start() if r.message is not None]
            finally:
                await reader.stop()
            tps = list(self.observer.assignment())
            self.observer.resume(*tps)
            await seek_to_end(self.observer, tps)  # the high watermark, which ListOffsets may not say
            latest = {}
            for d in records:
                latest[d["model"]] = max(latest.get(d["model"], 0), d["generation"])
            c = self.suspended
            if c is None or latest != {n: g for n, g in self.published.items() if g}:
                c = Controller.from_records(records, defaults=self.options.defaults)
            # else: the lease came back and nobody decided meanwhile: keep the windows in memory
            self.suspended = None
            c.set_policy(self.policy, self.options.policy_dry_run)
            c.load_actions(done)
            self.published = {n: m.generation for n, m in c.models.items()}
            self.controller = c
            self.metrics.leader.set(1)
            self.became_leader.set()
            log.info("%s is the leader: resumed %d models from %d records on %s; %d actions on %s; response "
                     "policy of %d rules%s", self.instance, len(c.models), len(records), topics.ROLLOUT, len(done),
                     topics.ACTIONS, len(self.policy), " (dry run)" if self.options.policy_dry_run else "")
            for n, m in c.models.items():
                log.info("  %s: %s, stable %s%s, generation %d", n, m.phase, m.stable,
                         f", candidate {m.candidate} step {m.step}" if m.candidate else "", m.generation)

    async def _step_down(self, why: str) -> None:
        async with self.lock:
            if not self.leader:
                return
            self.suspended, self.controller = self.controller, None
            self.metrics.leader.set(0)
            self.became_leader.clear()
            if self.observer is not None:
                self.observer.pause(*self.observer.assignment())
            if self.publisher is not None:
                await self.publisher.flush(5.0)  # the next leader must read every decision made
            log.info("%s is no longer the leader (%s)", self.instance, why)

    # ---- work -----------------------------------------------------------------------

    async def _observe(self) -> None:
        while True:
            if not self.leader:
                await asyncio.sleep(0.1)
                continue
            batches = await self.observer.getmany(timeout_ms=200)
            async with self.lock:
                if not self.leader:
                    continue
                for records in batches.values():
                    for rec in records:
                        try:
                            self._observe_one(decode(rec))
                        except Exception:  # one record the controller cannot take must not stop it observing
                            log.exception("%s %d@%d not observed", rec.topic, rec.partition, rec.offset)
                self._publish_changes()

    def _observe_one(self, r) -> None:
        if r.message is None:
            return
        self.metrics.observations.labels(r.topic).inc()
        c, obs = self.controller, None
        if r.topic == topics.SIGNALS:
            obs = wire.signal(r.message)
        elif r.topic == topics.ALERTS:
            obs = wire.alert(r.message)
        if obs is not None:
            c.observe(obs)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick)
            async with self.lock:
                if self.leader:
                    self.controller.tick()
                    self._publish_changes()

    def _publish_changes(self) -> None:
        """Every model whose generation moved since it was last published: one record with
        its latest state (decisions are cumulative, so the latest carries everything)."""
        for name, m in self.controller.models.items():
            if m.generation > self.published.get(name, 0):
                d = self.controller.decision(name)
                self.publisher.publish(topics.ROLLOUT, name, wire.rollout_state(d, source=f"vigil-rollout/{self.instance}"))
                self.published[name] = m.generation
                self.metrics.decisions.labels(name, d.phase).inc()
                self.metrics.step.labels(name).set(d.step)
                for phase in PHASES:
                    self.metrics.phase.labels(name, phase).set(1.0 if phase == d.phase else 0.0)
                for v in m.versions:
                    self.metrics.weight.labels(name, v).set(d.weights.get(v, 0.0))
                log.info("%s generation %d: %s; weights %s; %s", name, d.generation, d.phase,
                         ", ".join(f"{v} {w:.0%}" for v, w in d.weights.items()), d.reason)
        for a in self.controller.take_actions():
            self._publish_action(a)
            if a.action == pol.RETRAIN and a.outcome in ("pending", "dry-run"):
                task = asyncio.get_running_loop().create_task(self._retrain(a))
                self.sending.add(task)
                task.add_done_callback(self.sending.discard)

    def _publish_action(self, a: ActionRecord) -> None:
        self.publisher.publish(topics.ACTIONS, a.action_id, wire.action(a, source=f"vigil-rollout/{self.instance}"))
        self.metrics.actions.labels(a.action, a.outcome).inc()
        log.info("action %s on %s %s by %s: %s; %s", a.action, a.model, a.version, a.policy, a.outcome, a.reason)

    # ---- retrain --------------------------------------------------------------------

    async def _retrain(self, a: ActionRecord) -> None:
        """Build the manifest, send it (not in dry-run), publish the outcome."""
        import dataclasses
        import time as _time

        rule = self.policy.rule(a.policy)
        details = dict(a.details)
        try:
            manifest = await self.manifest(a)
        except Exception as e:
            log.exception("retrain manifest for %s %s", a.model, a.version)
            manifest, error = None, f"the data ranges could not be found: {e}"
        else:
            error = ""
        details["manifest"] = manifest
        outcome = "dry-run" if a.outcome == "dry-run" else "failed"
        if a.outcome == "pending" and manifest is not None:
            if rule is None:
                error = f"policy rule {a.policy} is no longer in force"
            else:
                status, error = await send_signed(rule.url, rule.secret, manifest, rule.timeout)
                details["status"] = status
                if not error:
                    outcome = "sent"
        if error:
            details["error"] = error
        reason = a.reason + (f"; sent to {details.get('url')}" if outcome == "sent" else
                             f"; not sent: {error}" if outcome == "failed" else "")
        final = dataclasses.replace(a, outcome=outcome, details=details, reason=reason, time=_time.time())
        async with self.lock:
            if self.controller is not None:
                self.controller.settle(final)
            self._publish_action(final)

    async def manifest(self, a: ActionRecord) -> dict:
        since = float(a.details.get("since") or a.alert_starts_at or a.time)
        ranges = await self.data_ranges(since)
        return {"kind": "vigil.retrain", "schema": 1, "action_id": a.action_id, "model": a.model, "version": a.version,
                "policy": a.policy, "reason": a.reason,
                "alerts": [{"alertname": a.alert_name, "fingerprint": a.alert_fingerprint, "labels": a.alert_labels,
                            "starts_at": _rfc3339(a.alert_starts_at)}],
                "signals": a.details.get("signals", []),
                "since": _rfc3339(since), "key": topics.event_key(a.model), "data": ranges}

    async def data_ranges(self, since: float) -> list[dict]:
        """Per topic (vigil.inference.events, vigil.feedback) and partition: [start_offset,
        end_offset) of the records written at or after `since` (seconds), up to now."""
        out = []
        for topic in (topics.INFERENCE, topics.FEEDBACK):
            consumer = self.kafka.consumer(f"vigil-rollout-manifest-{self.instance}")  # one per topic: an
            await consumer.start()                                                   # assigned one asks no other
            try:
                tps = await self.kafka.partitions(consumer, topic, 10.0)
                consumer.assign(tps)
                since_ms = int(since * 1000)
                found = await consumer.offsets_for_times({tp: since_ms for tp in tps})
                ends = await seek_to_end(consumer, tps)
                begins = await consumer.beginning_offsets(tps)
                parts = []
                for tp in tps:
                    end = ends[tp]
                    guess = found[tp].offset if found.get(tp) is not None else None
                    start = await first_offset_at(consumer, tp, since_ms, begins.get(tp, 0), end, guess)
                    parts.append({"partition": tp.partition, "start_offset": start, "end_offset": end})
            finally:
                await stop_consumer(consumer)
            out.append({"topic": topic, "partitions": parts})
        return out

    # ---- admin API ------------------------------------------------------------------

    async def command(self, op: str, kw: dict):
        async with self.lock:
            if not self.leader:
                raise NotLeader(self.instance)
            result = LocalApi(self.controller, register_candidates=True).call(op, **kw)
            self._publish_changes()
            return plain(result)

    async def _serve_admin(self) -> None:
        app = web.Application()

        async def api(request: web.Request) -> web.Response:
            try:
                return web.json_response(await self.command(request.match_info["op"], body(await request.read())))
            except NotLeader as e:
                return web.json_response({"error": str(e), "field": ""}, status=503)
            except RolloutError as e:
                return web.json_response({"error": str(e), "field": e.field}, status=400)

        async def healthz(request: web.Request) -> web.Response:
            return service.health(self.tasks, instance=self.instance, leader=self.leader)

        async def metrics(request: web.Request) -> web.Response:
            return service.metrics(self.metrics.registry)

        app.router.add_post("/api/{op}", api)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        self.runner, self.admin_port = await service.listen(app, self.options.host, self.options.admin_port,
                                                            "--admin-port")


def body(raw: bytes) -> dict:
    """A request's body: UTF-8 JSON (whatever charset its headers claim), numbers finite;
    empty for no arguments."""
    def finite(text: str) -> float:
        if not math.isfinite(v := float(text)):
            raise RolloutError("body", f"{text[:20]} is not a finite number")
        return v

    def constant(text: str):
        raise RolloutError("body", f"{text} is not a JSON number")

    if not raw.strip():
        return {}
    try:
        kw = json.loads(raw.decode("utf-8"), parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise RolloutError("body", "is nested too deeply") from None
    except UnicodeDecodeError as e:
        raise RolloutError("body", f"is not UTF-8: {e.reason} at byte {e.start}") from None
    except RolloutError:
        raise
    except ValueError as e:
        raise RolloutError("body", f"is not JSON: {e}") from None
    if not isinstance(kw, dict):
        raise RolloutError("body", "must be a JSON object")
    return kw


class NotLeader(RuntimeError):
    def __init__(self, instance: str):
        super().__init__(f"{instance} is a standby, not the leader; ask the leader")


class _Lease(ConsumerRebalanceListener):
    def __init__(self, service: RolloutService):
        self.service = service

    async def on_partitions_revoked(self, revoked):
        if revoked:
            await self.service._step_down("lease revoked")

    async def on_partitions_assigned(self, assigned):
        if assigned:
            try:
                await self.service._take_over()
            except Exception:
                log.exception("taking over the rollout state failed")


async def _timestamp_at(consumer, tp, offset: int):
    """(offset, timestamp in ms) of the first record at or after `offset`; None past the end."""
    consumer.seek(tp, offset)
    got = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
    records = got.get(tp) or []
    return (records[0].offset, records[0].timestamp) if records else None


async def first_offset_at(consumer, tp, since_ms: int, begin: int, end: int, guess: int | None) -> int:
    """The first offset in [begin, end) whose record's timestamp is at or after `since_ms`
    (`end` if none). ListOffsets by time (`guess`) is taken where the records around it
    bear it out; otherwise (Tansu answers 0 whatever the time) a binary search reads the
    timestamps of about log2(end - begin) single records, none of the rest."""
    if begin >= end:
        return end
    if guess is not None and begin <= guess <= end:
        at = await _timestamp_at(consumer, tp, guess) if guess < end else None
        before = await _timestamp_at(consumer, tp, guess - 1) if guess > begin else None
        if (at is None or at[1] >= since_ms) and (guess == begin or (before is not None and before[1] < since_ms)):
            return guess
    lo, hi = begin, end
    while lo < hi:
        mid = (lo + hi) // 2
        rec = await _timestamp_at(consumer, tp, mid)
        if rec is None or rec[0] >= hi or rec[1] >= since_ms:
            hi = mid
        else:
            lo = rec[0] + 1
    return lo


async def send_signed(url: str, secret: bytes, body: dict, timeout: float, attempts: int = 3) -> tuple[int, str]:
    """POST `body` as JSON with the signature header; (HTTP status, "" or the error). A
    connection failure or a 5xx is tried again, up to `attempts` times."""
    import aiohttp

    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "Vigil-Rollout/0.1", SIGNATURE_HEADER: sign(secret, raw)}
    status, error = 0, ""
    for attempt in range(attempts):
        if attempt:
            await asyncio.sleep(0.5 * 2 ** attempt)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
                async with http.post(url, data=raw, headers=headers) as r:
                    status = r.status
                    if 200 <= r.status < 300:
                        return status, ""
                    error = f"{url} answered HTTP {r.status}: {(await r.text())[:200]}"
                    if r.status < 500:
                        return status, error
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            error = f"{url}: {type(e).__name__}: {e}"
    return status, error


def _rfc3339(t: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat().replace("+00:00", "Z") if t else ""


async def run(options: ServiceOptions, until=None) -> None:
    """Run until SIGINT or SIGTERM, or until `until()` returns when it is given; SIGHUP
    reloads the response policy."""
    s = RolloutService(options)
    await service.serve(s, "vigil rollout", lambda s: (
        f"vigil rollout {s.instance}: admin API on http://{options.host}:{s.admin_port} "
        f"(/api/<op>, /healthz, /metrics), Kafka at {options.bootstrap_servers}; response policy "
        f"{options.policy or 'none'} ({len(s.policy)} rules{', dry run' if options.policy_dry_run else ''})"),
        run=until, reload=s.reload_policy)

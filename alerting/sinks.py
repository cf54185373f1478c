"""Where notifications and alerts go.

- Webhooks: Alertmanager's webhook JSON, version "4", every field, POSTed with a timeout,
  retried with exponential backoff and jitter on connection errors, timeouts, 5xx and 429,
  signed with HMAC-SHA256 over the exact body (header `X-Vigil-Signature: sha256=<hex>`).
  Each receiver has its own delivery queue and workers, so a slow or dead receiver only
  delays itself; a newer notification for a group replaces a queued older one.
- Alertmanager: alerts (not notifications) POSTed to `/api/v2/alerts` as Prometheus does,
  on every state change and again every `resend_interval` while firing.

A receiver that stays down: after `max_attempts` the notification counts as failed, the
notification log is not written, and the group's next flush tries again. Alert state is
never touched by delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from collections import OrderedDict
from typing import Awaitable, Callable

import aiohttp

from eventbus.signing import SIGNATURE_HEADER, sign

from .config import AlertmanagerTarget, WebhookConfig
from .durations import rfc3339
from .signals import Alert, Notification

log = logging.getLogger("vigil.alerting")

USER_AGENT = "Vigil-Alerting/0.1"
_GO_META = set("\\.+*?()|[]{}^$")


def go_quote_meta(s: str) -> str:
    return "".join("\\" + c if c in _GO_META else c for c in s)


def alert_json(a: Alert, now: float) -> dict:
    resolved = a.resolved_by(now)
    return {
        "status": "resolved" if resolved else "firing",
        "labels": dict(a.labels),
        "annotations": dict(a.annotations),
        "startsAt": rfc3339(a.starts_at),
        # Alertmanager shows no end for an alert that has not ended yet
        "endsAt": rfc3339(a.ends_at if resolved else None),
        "generatorURL": a.generator_url,
        "fingerprint": a.fp_hex,
    }


def _common(dicts: list[dict]) -> dict:
    if not dicts:
        return {}
    common = dict(dicts[0])
    for d in dicts[1:]:
        for k in list(common):
            if d.get(k) != common[k]:
                del common[k]
    return common


def webhook_payload(n: Notification, external_url: str, now: float) -> dict:
    """Alertmanager's webhook message (notify/webhook Message, template.Data), in its key order."""
    alerts = [alert_json(a, now) for a in n.alerts]
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {
        "receiver": go_quote_meta(n.receiver),
        "status": status,
        "alerts": alerts,
        "groupLabels": dict(n.group_labels),
        "commonLabels": _common([a["labels"] for a in alerts]),
        "commonAnnotations": _common([a["annotations"] for a in alerts]),
        "externalURL": external_url,
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": n.truncated,
    }


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random._inst) -> float:
    """Exponential backoff (base * 2**attempt, capped) with jitter: uniform in [d/2, d]."""
    d = min(cap, base * (2 ** attempt))
    return d / 2 + rng.random() * d / 2


class Outcome:
    __slots__ = ("ok", "attempts", "error", "status")

    def __init__(self, ok: bool, attempts: int, error: str = "", status: int = 0):
        self.ok, self.attempts, self.error, self.status = ok, attempts, error, status


async def post_with_retries(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict,
                            timeout: float, max_attempts: int, backoff: float, max_backoff: float,
                            on_retry: Callable[[int, str], None] | None = None) -> Outcome:
    err, status = "", 0
    for attempt in range(max_attempts):
        retry_after = 0.0
        try:
            async with session.post(url, data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                await r.read()
                status = r.status
                if 200 <= r.status < 300:
                    return Outcome(True, attempt + 1, status=r.status)
                err = f"HTTP {r.status}"
                if r.status != 429 and r.status < 500:
                    return Outcome(False, attempt + 1, err, r.status)  # the receiver refuses it: no retry
                ra = r.headers.get("Retry-After", "")
                if ra.isdigit():
                    retry_after = float(ra)
        except asyncio.TimeoutError:
            err = f"timeout after {timeout:g}s"
        except (aiohttp.ClientError, OSError) as e:
            err = f"{type(e).__name__}: {e}"
        if attempt + 1 < max_attempts:
            if on_retry:
                on_retry(attempt + 1, err)
            await asyncio.sleep(min(max_backoff, max(retry_after, backoff_delay(attempt, backoff, max_backoff))))
    return Outcome(False, max_attempts, err, status)


class WebhookSender:
    def __init__(self, cfg: WebhookConfig, session_getter: Callable[[], aiohttp.ClientSession], external_url: str,
                 clock, on_retry: Callable[[int, str], None] | None = None):
        self.cfg = cfg
        self.session = session_getter
        self.external_url = external_url
        self.clock = clock
        self.on_retry = on_retry

    def encode(self, n: Notification) -> tuple[bytes, dict]:
        body = json.dumps(webhook_payload(n, self.external_url, self.clock.now()), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **self.cfg.headers,
                   "X-Vigil-Group-Key": hashlib.sha256(n.group_key.encode()).hexdigest()[:32]}
        if self.cfg.hmac_secret:
            headers[SIGNATURE_HEADER] = sign(self.cfg.hmac_secret, body)
        return body, headers

    async def send(self, n: Notification) -> Outcome:
        body, headers = self.encode(n)
        c = self.cfg
        return await post_with_retries(self.session(), c.url, body, headers, c.timeout, c.max_attempts,
                                       c.backoff, c.max_backoff, self.on_retry)


class DeliveryQueue:
    """One receiver's queue: notifications keyed by (group, integration), so the queue holds
    at most one per group (a newer one replaces a queued older one: the latest state is
    what matters) and is bounded by `size`. `concurrency` workers drain it; two workers never
    send the same group at once, so a group's notifications arrive in order."""

    def __init__(self, name: str, send: Callable[[Notification], Awaitable[bool]], concurrency: int, size: int,
                 on_drop: Callable[[Notification, str], None]):
        self.name = name
        self._send = send
        self.size = size
        self.on_drop = on_drop
        self.pending: OrderedDict[tuple[str, str], Notification] = OrderedDict()
        self.active: set[tuple[str, str]] = set()
        self._event = asyncio.Event()
        self._workers = [asyncio.ensure_future(self._work()) for _ in range(max(1, concurrency))]
        self.idle = asyncio.Event()
        self.idle.set()

    def put(self, n: Notification) -> None:
        key = (n.group_key, n.integration)
        old = self.pending.pop(key, None)
        if old is not None:
            self.on_drop(old, "superseded")
        elif len(self.pending) >= self.size:
            _, oldest = self.pending.popitem(last=False)
            self.on_drop(oldest, "overflow")
        self.pending[key] = n
        self.idle.clear()
        self._event.set()

    def _take(self) -> Notification | None:
        for key in self.pending:
            if key not in self.active:
                self.active.add(key)
                return self.pending.pop(key)
        return None

    async def _work(self) -> None:
        while True:
            n = self._take()
            if n is None:
                if not self.pending and not self.active:
                    self.idle.set()
                self._event.clear()
                await self._event.wait()
                continue
            key = (n.group_key, n.integration)
            try:
                await self._send(n)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a sink must not kill the worker
                log.exception("delivery to %s failed", self.name)
            finally:
                self.active.discard(key)
                self._event.set()

    async def close(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


class AlertmanagerSink:
    """Feeds one real Alertmanager through POST /api/v2/alerts, as Prometheus does."""

    BATCH = 64

    def __init__(self, target: AlertmanagerTarget, session_getter: Callable[[], aiohttp.ClientSession], clock,
                 firing: Callable[[], list[Alert]], on_result: Callable[[bool, int, str], None]):
        self.target = target
        self.session = session_getter
        self.clock = clock
        self.firing = firing
        self.on_result = on_result
        self.pending: dict[int, Alert] = {}
        self._event = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())
        self.idle = asyncio.Event()
        self.idle.set()

    def put(self, alert: Alert) -> None:
        self.pending[alert.fingerprint] = alert
        self.idle.clear()
        self._event.set()

    def payload(self, alerts: list[Alert], now: float) -> list[dict]:
        out = []
        valid_until = now + 4 * self.target.resend_interval
        for a in alerts:
            ends = a.ends_at if a.ends_at is not None else valid_until
            out.append({"labels": dict(a.labels), "annotations": dict(a.annotations),
                        "startsAt": rfc3339(a.starts_at), "endsAt": rfc3339(ends), "generatorURL": a.generator_url})
        return out

    async def _run(self) -> None:
        next_resend = time.monotonic() + self.target.resend_interval
        while True:
            if not self.pending:
                self.idle.set()
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), max(0.0, next_resend - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
            if time.monotonic() >= next_resend:
                for a in self.firing():
                    self.pending.setdefault(a.fingerprint, a)
                next_resend = time.monotonic() + self.target.resend_interval
            if not self.pending:
                continue
            batch = list(self.pending.values())[:self.BATCH]
            for a in batch:
                del self.pending[a.fingerprint]
            t = self.target
            try:
                body = json.dumps(self.payload(batch, self.clock.now())).encode()
                out = await post_with_retries(self.session(), f"{t.url}/api/v2/alerts", body,
                                              {"Content-Type": "application/json", "User-Agent": USER_AGENT},
                                              t.timeout, t.max_attempts, t.backoff, 4 * t.backoff)
            except Exception as exc:  # a bug must not end the feed: counted as a failed post
                log.exception("posting to the Alertmanager at %s failed", t.url)
                out = Outcome(False, 0, f"{type(exc).__name__}: {exc}")
            self.on_result(out.ok, len(batch), out.error)
            if not out.ok:
                # firing alerts come back with the next resend; resolutions are kept until
                # they get through (the endsAt of the last firing post bounds the damage)
                for a in batch:
                    if a.ends_at is not None:
                        self.pending.setdefault(a.fingerprint, a)
                await asyncio.sleep(4 * t.backoff)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

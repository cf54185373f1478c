"""What the page asks of the other services over their HTTP APIs (it imports none of them):

- `Actions`: an operator's pause, resume, promote, roll back and undo, sent to the rollout
  controller's admin API (POST <rollout-url>/api/<op> with the arguments as JSON), behind
  the admin key where the page has a key file (the same file as `vigil serve --auth-keys`:
  a key with `admin: true`, sent as `Authorization: Bearer <key>`, which is passed on).
- `Silences`: the alerts that a silence mutes, read from alerting's Alertmanager-compatible
  API (GET <alerting-url>/api/v2/alerts and /api/v2/silences; a real Alertmanager answers
  the same), since vigil.alerts records state changes only, not silences. Alerts are
  matched by their labels, which both carry whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import aiohttp

from .model import label_key

log = logging.getLogger(__name__)

# the page's name of an action -> the controller's operation
ACTIONS = {"pause": "pause", "resume": "resume", "promote": "promote", "rollback": "abort", "undo": "undo"}
TEXT_LIMIT = 2000


class ActionError(Exception):
    def __init__(self, status: int, message: str, field: str = ""):
        super().__init__(message)
        self.status, self.field = status, field


class Actions:
    def __init__(self, rollout_url: str, keys_file: str = "", timeout: float = 10.0):
        self.rollout_url, self.timeout = rollout_url.rstrip("/"), timeout
        self.store = None
        if keys_file:
            from eventbus.apikeys import AuthOptions, KeyFileError, KeyStore

            try:
                self.store = KeyStore(AuthOptions(keys_file=keys_file))
            except KeyFileError as e:
                raise ValueError(f"--auth-keys: {e}") from None

    @property
    def enabled(self) -> bool:
        return bool(self.rollout_url)

    def describe(self) -> dict:
        return {"enabled": self.enabled, "key_required": self.store is not None, "names": list(ACTIONS)}

    def check_key(self, authorization: str | None) -> str:
        """The key's name where keys are on (ActionError 401/403 otherwise); '' where they are off."""
        if self.store is None:
            return ""
        from eventbus.apikeys import AuthError

        self.store.maybe_reload()
        try:
            key = self.store.authenticate([("authorization", authorization)] if authorization else [])
        except AuthError as e:
            raise ActionError(401, str(e).removeprefix("authorization: "), "authorization") from None
        if not key.admin:
            raise ActionError(403, f"API key {key.name!r} has no admin right (admin: true in the key file)",
                              "authorization")
        return key.name

    @staticmethod
    def arguments(action: str, body: dict) -> tuple[str, dict]:
        if action not in ACTIONS:
            raise ActionError(404, f"{action!r} is not one of {', '.join(ACTIONS)}", "action")
        model = body.get("model")
        if not isinstance(model, str) or not model or len(model) > 200:
            raise ActionError(400, "must be the model's name", "model")
        kw = {"model": model}
        reason = body.get("reason")
        if action == "pause" and reason:
            if not isinstance(reason, str) or len(reason) > TEXT_LIMIT:
                raise ActionError(400, f"must be text of at most {TEXT_LIMIT} characters", "reason")
            kw["reason"] = reason
        return ACTIONS[action], kw

    async def call(self, action: str, body: dict, authorization: str | None, who: str) -> dict:
        if not self.enabled:
            raise ActionError(503, "actions are off: the page was started without --rollout-url")
        op, kw = self.arguments(action, body)
        if op == "pause" and "reason" not in kw:
            kw["reason"] = f"paused from the page{f' by {who}' if who else ''}"
        headers = {"Content-Type": "application/json"}
        if authorization:
            headers["Authorization"] = authorization
        url = f"{self.rollout_url}/api/{op}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as http:
                async with http.post(url, data=json.dumps(kw), headers=headers) as r:
                    text = await r.text()
                    try:
                        answer = json.loads(text) if text else None
                    except ValueError:
                        answer = {"error": text[:500]}
                    if r.status >= 400:
                        message = answer.get("error") if isinstance(answer, dict) else None
                        raise ActionError(r.status if r.status < 500 else 502,
                                          f"the rollout controller answered {r.status}: {message or text[:500]}",
                                          answer.get("field", "") if isinstance(answer, dict) else "")
                    log.info("action %s on %s%s: done", action, kw["model"], f" by {who}" if who else "")
                    return {"action": action, "op": op, "model": kw["model"], "result": answer}
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ActionError(502, f"cannot reach the rollout controller at --rollout-url {self.rollout_url}: "
                                   f"{e or type(e).__name__}") from None


class Silences:
    """Polls alerting's Alertmanager-compatible API; `on_change(silenced, silences, error)`
    gets {label_key: [silence ids]} of the muted alerts, the silences, and what went wrong
    (or None), each time any of them changes."""

    def __init__(self, alerting_url: str, on_change: Callable[[dict, list, str | None], None], every: float = 2.0):
        self.url, self.on_change, self.every = alerting_url.rstrip("/"), on_change, every
        self.last: tuple | None = None

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while True:
                silenced, silences, error = {}, [], None
                try:
                    async with http.get(f"{self.url}/api/v2/alerts") as r:
                        r.raise_for_status()
                        for a in await r.json():
                            by = (a.get("status") or {}).get("silencedBy") or []
                            if by:
                                silenced[label_key(a.get("labels") or {})] = list(by)
                    async with http.get(f"{self.url}/api/v2/silences") as r:
                        r.raise_for_status()
                        silences = [silence(s) for s in await r.json()]
                except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                    error = f"cannot read silences from --alerting-url {self.url}: {e or type(e).__name__}"
                now = (silenced, silences, error)
                if now != self.last:
                    self.last = now
                    self.on_change(silenced, silences, error)
                await asyncio.sleep(self.every)


def silence(s: dict) -> dict:
    """An Alertmanager v2 gettableSilence, as the page shows it."""
    def op(m):
        return ("=~" if m.get("isRegex") else "=") if m.get("isEqual", True) else ("!~" if m.get("isRegex") else "!=")
    return {"id": str(s.get("id", "")), "state": str((s.get("status") or {}).get("state", "")),
            "matchers": [f"{m.get('name')}{op(m)}{m.get('value')}" for m in s.get("matchers") or []],
            "created_by": str(s.get("createdBy", "")), "comment": str(s.get("comment", "")),
            "starts_at": str(s.get("startsAt", "")), "ends_at": str(s.get("endsAt", ""))}

"""The alerting service's HTTP admin API, shaped like Alertmanager's v2 API where the two
overlap, so `amtool --alertmanager.url=` and scripts written for Alertmanager work on it:

    GET  /-/healthy  /-/ready          health; ready answers 503 naming the tasks that are down
    POST /-/reload                     reload rules and configuration (keeps the last good on error)
    GET  /metrics                      Prometheus metrics
    GET  /api/v2/alerts                alerts with their silenced/inhibited status
    GET  /api/v2/silences              silences (filter=name="value" narrows them)
    POST /api/v2/silences              create or update -> {"silenceID": ...}
    GET  /api/v2/silence/{id}          one silence
    DELETE /api/v2/silence/{id}        expire it
    GET  /api/v1/rules                 the loaded rules and their alert instances
    GET  /api/v1/groups                aggregation groups
"""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventbus.service import listen

from .durations import rfc3339
from .labels import parse_matchers
from .signals import FIRING, PENDING, RESOLVED
from .silences import SilenceError, parse_api_silence


def _json(data, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


class AdminServer:
    def __init__(self, core, host: str = "127.0.0.1", port: int = 9095, down=lambda: []):
        """`down()`: the names of the service's tasks that are down (for /-/ready)."""
        self.core = core
        self.down = down
        self.host, self.port = host, port
        self.app = web.Application()
        r = self.app.router
        r.add_get("/-/healthy", self.ok)
        r.add_get("/-/ready", self.ready)
        r.add_post("/-/reload", self.reload)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/v2/alerts", self.alerts)
        r.add_get("/api/v2/silences", self.list_silences)
        r.add_post("/api/v2/silences", self.post_silence)
        r.add_get("/api/v2/silence/{id}", self.get_silence)
        r.add_delete("/api/v2/silence/{id}", self.delete_silence)
        r.add_get("/api/v1/rules", self.rules)
        r.add_get("/api/v1/groups", self.groups)
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        self._runner, self.port = await listen(self.app, self.host, self.port, "--admin-port")
        return self.port

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def ok(self, request):
        return web.Response(text="OK")

    async def ready(self, request):
        """503 while a task of the service waits to be restarted after a failure."""
        down = self.down()
        return web.Response(text=f"not ready: {', '.join(down)} down" if down else "OK", status=503 if down else 200)

    async def reload(self, request):
        errors = self.core.reload()
        if errors:
            return _json({"status": "error", "errors": [str(e) for e in errors]}, 500)
        return _json({"status": "success"})

    async def metrics(self, request):
        return web.Response(body=generate_latest(self.core.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def alerts(self, request):
        core = self.core
        now = core.clock.now()
        out = []
        for inst in core.engine.instances.values():
            if inst.state not in (FIRING, PENDING, RESOLVED):
                continue
            a = core.engine.alert_of(inst, now)
            silenced = core.silences.silenced_by(a.labels, now)
            inhibited = [f"{x:016x}" for x in core.dispatcher.inhibitor.inhibited_by(a, now)]
            state = "suppressed" if (silenced or inhibited) else ("active" if inst.state == FIRING else "unprocessed")
            receivers = [{"name": r.receiver} for r in core.config.route.match(a.labels)]
            out.append({"labels": a.labels, "annotations": a.annotations, "startsAt": rfc3339(a.starts_at),
                        "endsAt": rfc3339(a.ends_at), "updatedAt": rfc3339(inst.last_signal),
                        "fingerprint": a.fp_hex, "generatorURL": a.generator_url, "receivers": receivers,
                        "status": {"state": state, "silencedBy": silenced, "inhibitedBy": inhibited},
                        "vigil": {"state": inst.state, "activeAt": rfc3339(inst.active_at), "value": inst.value}})
        return _json(out)

    async def list_silences(self, request):
        now = self.core.clock.now()
        filters = []
        for f in request.query.getall("filter", []):
            try:
                filters.extend(parse_matchers(f))
            except ValueError as e:
                return _json({"error": str(e)}, 400)
        out = []
        for s in self.core.silences.list(now):
            if filters:
                have = {(m.name, m.op, m.value) for m in s.matchers}
                if not all((f.name, f.op, f.value) in have for f in filters):
                    continue
            out.append(s.to_api(now))
        return _json(out)

    async def post_silence(self, request):
        now = self.core.clock.now()
        try:
            body = await request.json()
            kw = parse_api_silence(body, now)
            s = self.core.silences.add(now=now, **kw)
        except (SilenceError, ValueError) as e:
            return _json({"error": str(e)} if not isinstance(e, SilenceError) else str(e), 400)
        self.core.wake()
        return _json({"silenceID": s.id})

    async def get_silence(self, request):
        s = self.core.silences.silences.get(request.match_info["id"])
        if s is None:
            return _json({"error": "not found"}, 404)
        return _json(s.to_api(self.core.clock.now()))

    async def delete_silence(self, request):
        try:
            self.core.silences.expire(request.match_info["id"], self.core.clock.now())
        except SilenceError as e:
            return _json(str(e), 404 if "no silence" in str(e) else 400)
        self.core.wake()
        return web.Response(status=200)

    async def rules(self, request):
        core = self.core
        by_rule: dict[int, list] = {}
        for inst in core.engine.instances.values():
            by_rule.setdefault(inst.rule.index, []).append(
                {"labels": inst.labels, "state": inst.state, "activeAt": rfc3339(inst.active_at),
                 "value": inst.value, "fingerprint": f"{inst.fp:016x}"})
        groups: dict[str, list] = {}
        for r in core.engine.rules.rules:
            groups.setdefault(r.group, []).append({
                "name": r.name, "kind": r.kind, "file": r.file, "line": r.line,
                "matchers": [str(m) for m in r.matchers.values()], "test": r.test_text, "for": r.for_,
                "keep_firing_for": r.keep_firing_for, "alerts": by_rule.get(r.index, [])})
        return _json({"groups": [{"name": k, "rules": v} for k, v in groups.items()]})

    async def groups(self, request):
        return _json(self.core.dispatcher.groups_view())

"""The page's calls to the other services, without a browser: the operator's actions
passed on to a rollout controller's admin API (here a recorder on loopback that answers as
the controller does) behind the admin key, refused when cross-site or not JSON; and which
alerts are silenced, read from a real Alertmanager's v2 API (Debian's), matched to the
vigil.alerts records on the embedded broker by their labels."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid

import aiohttp
import pytest
from aiohttp import web

from console.service import Console, Options
from eventbus.apikeys import ApiKey, entry_yaml, hash_secret
from eventbus.broker import free_port
from protos import events_pb2
from tests.helpers.messages import alert, ensure_topics, produce
from tests.helpers.tools import require_tool
from tests.helpers.waiting import until

on_session_loop = pytest.mark.asyncio(loop_scope="session")  # as the fixtures

ADMIN, READER = "vk_admin-secret-for-the-test", "vk_reader-secret-for-the-test"


class Controller:
    """Answers POST /api/<op> as the rollout controller's admin API does, and records it."""

    def __init__(self):
        self.calls: list[tuple[str, dict, str | None]] = []

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/{op}", self.api)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def api(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append((request.match_info["op"], body, request.headers.get("Authorization")))
        if body["model"] == "unknown":
            return web.json_response({"error": "model: unknown model 'unknown'", "field": "model"}, status=400)
        return web.json_response({"model": body["model"], "phase": "paused", "reason": body.get("reason", "")})


@on_session_loop
async def test_actions_go_to_the_controller_behind_the_admin_key(kafka_broker, tmp_path):
    controller = Controller()
    rollout_url = await controller.start()
    keys = tmp_path / "keys.yml"
    keys.write_text(entry_yaml(ApiKey("ops", "platform", hash_secret(ADMIN), admin=True))
                    + entry_yaml(ApiKey("web", "acme", hash_secret(READER))))
    console = Console(Options(bootstrap_servers=kafka_broker.bootstrap_servers, port=0, rollout_url=rollout_url,
                              auth_keys=str(keys)))
    await console.start()
    url = console.url + "api/actions/"
    try:
        async with aiohttp.ClientSession() as http:
            async def post(action, body, key=ADMIN, **headers):
                if key:
                    headers["Authorization"] = f"Bearer {key}"
                async with http.post(url + action, data=json.dumps(body),
                                     headers={"Content-Type": "application/json", **headers}) as r:
                    return r.status, await r.json()

            async with http.get(console.url + "api/state") as r:
                assert (await r.json())["actions"] == {"enabled": True, "key_required": True,
                                                       "names": ["pause", "resume", "promote", "rollback", "undo"]}
            status, done = await post("pause", {"model": "m"}, Origin=console.url.rstrip("/"))
            assert status == 200 and done["op"] == "pause" and done["result"]["phase"] == "paused"
            assert controller.calls[-1] == ("pause", {"model": "m", "reason": "paused from the page by ops"},
                                            f"Bearer {ADMIN}")
            for action, op in (("resume", "resume"), ("promote", "promote"), ("rollback", "abort"), ("undo", "undo")):
                assert (await post(action, {"model": "m"}))[0] == 200
                assert controller.calls[-1][:2] == (op, {"model": "m"})

            calls = len(controller.calls)
            assert await post("pause", {"model": "m"}, key=None) == (
                401, {"error": "missing; send the metadata 'authorization: Bearer <API key>'", "field": "authorization"})
            assert (await post("pause", {"model": "m"}, key="vk_wrong"))[1]["error"] == "unknown API key"
            assert await post("pause", {"model": "m"}, key=READER) == (
                403, {"error": "API key 'web' has no admin right (admin: true in the key file)", "field": "authorization"})
            status, refused = await post("pause", {"model": "m"}, Origin="http://evil.example")
            assert status == 403 and refused["field"] == "origin"
            assert (await post("pause", {"model": "m"}, **{"Sec-Fetch-Site": "cross-site"}))[0] == 403
            async with http.post(url + "pause", data="model=m", headers={
                    "Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 415
            assert await post("explode", {"model": "m"}) == (
                404, {"error": "'explode' is not one of pause, resume, promote, rollback, undo", "field": "action"})
            assert (await post("pause", {"model": 3}))[1]["field"] == "model"
            assert len(controller.calls) == calls  # none of those reached the controller

            status, answer = await post("resume", {"model": "unknown"})
            assert status == 400 and answer == {"error": "the rollout controller answered 400: model: unknown model "
                                                         "'unknown'", "field": "model"}
        await controller.runner.cleanup()
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "pause", json={"model": "m"}, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
                assert r.status == 502 and "cannot reach the rollout controller at --rollout-url" in (await r.json())["error"]
    finally:
        await console.stop()


@on_session_loop
async def test_without_a_rollout_url_actions_are_off(kafka_broker):
    console = Console(Options(bootstrap_servers=kafka_broker.bootstrap_servers, port=0))
    await console.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(console.url + "api/actions/pause", json={"model": "m"}) as r:
                assert r.status == 503 and "without --rollout-url" in (await r.json())["error"]
    finally:
        await console.stop()


def http_json(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture
def alertmanager(tmp_path):
    port = free_port()
    cfg = tmp_path / "am.yml"
    cfg.write_text("route:\n  receiver: none\nreceivers:\n  - name: none\n")
    proc = subprocess.Popen([require_tool("prometheus-alertmanager", "alertmanager"), f"--config.file={cfg}",
                             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--cluster.listen-address=", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            http_json(f"{url}/api/v2/status")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"alertmanager did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)  # polling the port, not waiting for an effect
    yield url
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()


@on_session_loop
async def test_silenced_alerts_come_from_the_alertmanager_api(kafka_broker, alertmanager):
    bootstrap = kafka_broker.bootstrap_servers
    await ensure_topics(bootstrap)
    model = f"silenced-{uuid.uuid4().hex[:6]}"
    a = alert(model, "2", events_pb2.ALERT_STATE_FIRING)
    loud = alert(f"{model}-loud", "2", events_pb2.ALERT_STATE_FIRING)
    now = time.time()
    until_ = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600))
    http_json(f"{alertmanager}/api/v2/alerts", [{"labels": dict(x.labels), "annotations": dict(x.annotations),
                                                 "endsAt": until_} for x in (a, loud)])
    silence = http_json(f"{alertmanager}/api/v2/silences", {
        "matchers": [{"name": "model", "value": model, "isRegex": False, "isEqual": True}],
        "startsAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 60)), "endsAt": until_,
        "createdBy": "<b>oncall</b>", "comment": "deploying"})["silenceID"]
    await produce(bootstrap, a, loud)
    console = Console(Options(bootstrap_servers=bootstrap, port=0, alerting_url=alertmanager, silences_every=0.2))
    await console.start()
    try:
        async with aiohttp.ClientSession() as http:
            async def state():
                async with http.get(console.url + "api/state") as r:
                    return await r.json()

            async def silenced():
                s = await state()
                mine = {x["labels"]["model"]: x for x in s["alerts"] if x["labels"]["model"].startswith(model)}
                return s if len(mine) == 2 and mine[model]["silenced_by"] else None

            s = await until(silenced, 30, "the alert marked silenced")
            mine = {x["labels"]["model"]: x for x in s["alerts"] if x["labels"]["model"].startswith(model)}
            assert mine[model]["silenced_by"] == [silence] and mine[model]["state"] == "firing"
            assert mine[f"{model}-loud"]["silenced_by"] == []
            assert s["silences_error"] is None and s["alerting_url"] == alertmanager
            shown = next(x for x in s["silences"] if x["id"] == silence)
            assert shown["matchers"] == [f"model={model}"] and shown["created_by"] == "<b>oncall</b>"
            assert shown["state"] == "active"

            async with http.delete(f"{alertmanager}/api/v2/silence/{silence}") as r:
                assert r.status == 200
            await until(lambda: state_check(state, lambda s: next(
                x for x in s["alerts"] if x["labels"]["model"] == model)["silenced_by"] == []), 30, "the silence lifted")
    finally:
        await console.stop()


async def state_check(state, check):
    return check(await state())


def test_vigil_up_gives_the_page_the_controller_alerting_and_the_key_file(tmp_path):
    from vigil import stack

    ui = next(s for s in stack.services("b:1", 8003, 9095, 8004, set(), ui_port=8005, ui_keys="keys.yml")
              if s.name == "ui")
    assert ui.args[ui.args.index("--rollout-url") + 1] == "http://127.0.0.1:8004"
    assert ui.args[ui.args.index("--alerting-url") + 1] == "http://127.0.0.1:9095"
    assert ui.args[ui.args.index("--auth-keys") + 1].endswith("/keys.yml")
    ui = next(s for s in stack.services("b:1", 8003, 9095, 8004, {"rollout", "alerting"}, ui_port=8005)
              if s.name == "ui")
    assert not {"--rollout-url", "--alerting-url", "--auth-keys"} & set(ui.args)

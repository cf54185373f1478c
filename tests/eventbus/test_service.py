"""The services' lifecycle (eventbus.service): start, serve until signalled, stop, and the
health and metrics endpoints every service answers with."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from eventbus import service
from eventbus.ports import PortError
from eventbus.supervise import Supervisor
from tests.helpers.waiting import until


class Fake:
    """A service that records what was done to it."""

    def __init__(self, on_start=None):
        self.done: list[str] = []
        self.on_start = on_start

    async def start(self) -> None:
        self.done.append("start")
        if self.on_start is not None:
            await self.on_start()
        self.done.append("started")

    async def stop(self) -> None:
        self.done.append("stop")


async def test_a_service_runs_until_sigterm_then_stops(capsys):
    fake, seen = Fake(), []
    task = asyncio.create_task(service.serve(fake, "vigil fake", lambda s: f"vigil fake: up ({s.done[-1]})",
                                             ready=seen.append))
    await until(lambda: seen, 10, "the service ready")
    assert seen == [fake] and fake.done == ["start", "started"]
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)
    assert fake.done == ["start", "started", "stop"]
    assert capsys.readouterr().out.splitlines() == ["vigil fake: up (started)", "vigil fake: shutting down",
                                                    "vigil fake: stopped"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler went with the service


async def test_a_stop_asked_for_during_start_up_stops_it_once_started():
    async def signalled_meanwhile():
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.05)  # start goes on while the handler runs

    fake = Fake(on_start=signalled_meanwhile)
    await asyncio.wait_for(service.serve(fake, "vigil fake", lambda s: "up"), 10)
    assert fake.done == ["start", "started", "stop"]


async def test_a_failed_start_still_stops_what_it_started_and_raises_its_error():
    async def fail():
        raise PortError("metrics: cannot listen on 127.0.0.1:1: permission denied")

    fake = Fake(on_start=fail)
    with pytest.raises(PortError, match="cannot listen"):
        await service.serve(fake, "vigil fake", lambda s: "never printed")
    assert fake.done == ["start", "stop"]


async def test_run_ends_the_service_and_sighup_reloads():
    fake, stopping, reloads = Fake(), asyncio.Event(), []

    async def work():
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # sets `stopping`, which ends the work
        await stopping.wait()
        fake.done.append("worked")

    await asyncio.wait_for(service.serve(fake, "vigil fake", lambda s: "up", run=work, stopping=stopping,
                                         reload=lambda: reloads.append(1)), 10)
    assert fake.done == ["start", "started", "worked", "stop"] and reloads == [1]


async def test_health_names_the_tasks_that_are_down_and_metrics_are_prometheus_text():
    registry = CollectorRegistry()
    tasks = Supervisor(registry, min_backoff=30)
    Counter("vigil_fake_things", "things", registry=registry).inc(3)
    failed = asyncio.Event()

    async def failing():
        failed.set()
        raise RuntimeError("injected")

    async def healthz(request):
        return service.health(tasks, instance="i-1")

    async def metrics(request):
        return service.metrics(registry)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner, port = await service.listen(app, "127.0.0.1", 0, "--admin-port")
    try:
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
        assert (status, body) == (200, '{"instance": "i-1", "ready": true, "down": []}')
        tasks.start("fake-work", failing)
        await failed.wait()
        await until(tasks.down, 10, "the task down")
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/healthz")
        assert (status, body) == (503, '{"instance": "i-1", "ready": false, "down": ["fake-work"]}')
        status, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "vigil_fake_things_total 3.0" in body
        assert 'vigil_task_failures_total{task="fake-work"} 1.0' in body
    finally:
        await tasks.stop()
        await runner.cleanup()


async def test_a_busy_port_is_refused_naming_the_option():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(PortError, match=f"--admin-port: cannot listen on 127.0.0.1:{port}"):
            await service.listen(web.Application(), "127.0.0.1", port, "--admin-port")
        with pytest.raises(PortError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            service.MetricsServer(CollectorRegistry(), "127.0.0.1", port).start()


async def test_the_metrics_server_serves_until_stopped_and_minus_one_is_none():
    registry = CollectorRegistry()
    Counter("vigil_fake_things", "things", registry=registry).inc()
    server = service.MetricsServer(registry, "127.0.0.1", 0)
    port = server.start()
    assert port > 0 and server.url == f"http://127.0.0.1:{port}/metrics"
    status, body = await asyncio.to_thread(get, server.url)
    assert status == 200 and "vigil_fake_things_total 1.0" in body
    await server.stop()
    with pytest.raises(OSError):
        await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
    none = service.MetricsServer(registry, "127.0.0.1", -1)
    assert none.start() == -1 and none.url == ""
    await none.stop()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()

"""The life of a service process: `vigil process`, `vigil alerting` and `vigil rollout`
run on this.

A service is an object with `async start()` and `async stop()`. `serve(service, name,
banner)` runs one as a command does, with these guarantees:

- SIGINT and SIGTERM are handled from before `start()`: a stop asked for during start-up
  ends the service cleanly once it has started, instead of killing it half made;
  SIGHUP calls `reload`, when one is given.
- When `start()` raises, `stop()` still runs (so the clients already started are
  closed) and the start's error is raised.
- Once started, `banner(service)` is printed and `ready(service)` called; then the
  service runs until signalled (or until `stopping` is set by someone else), or, with
  `run`, until `run()` returns (a service whose work is a loop that ends when `stopping`
  is set passes both).
- Then "<name>: shutting down" is printed, `stop()` awaited, "<name>: stopped" printed,
  and the signal handlers are removed, whatever ended the wait.

Health and metrics: a service's long-lived tasks run under an eventbus.supervise.
Supervisor, whose `down()` is its health; `health(tasks)` is the answer of a /healthz
endpoint (JSON, 503 naming the tasks that are down) and `metrics(registry)` of a /metrics
endpoint, for services with an aiohttp app of their own (`listen` starts it on a port,
the error naming the option when the port is taken). `MetricsServer` serves /metrics
alone, from a thread of its own so that a busy event loop never delays a scrape.

Nothing here blocks the event loop: the threaded server is shut down from a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eventbus.ports import cannot_listen, serve_metrics
from eventbus.supervise import Supervisor

log = logging.getLogger(__name__)


async def serve(service, name: str, banner: Callable[[object], str], *, ready: Callable | None = None,
                run: Callable[[], Awaitable] | None = None, stopping: asyncio.Event | None = None,
                reload: Callable[[], object] | None = None) -> None:
    """Start `service`, run it until SIGINT or SIGTERM (or `stopping`, or `run()`'s end),
    stop it; see the module's docstring."""
    loop = asyncio.get_running_loop()
    stopping = stopping if stopping is not None else asyncio.Event()
    handled = [signal.SIGINT, signal.SIGTERM]
    for sig in handled:
        loop.add_signal_handler(sig, stopping.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
        handled.append(signal.SIGHUP)
    try:
        try:
            await service.start()
        except BaseException:
            await _stop_after_failed_start(service, name)
            raise
        try:
            print(banner(service), flush=True)
            if ready is not None:
                ready(service)
            if run is not None:
                await run()
            else:
                await stopping.wait()
        finally:
            print(f"{name}: shutting down", flush=True)
            await service.stop()
            print(f"{name}: stopped", flush=True)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _stop_after_failed_start(service, name: str) -> None:
    try:
        await service.stop()
    except Exception:  # the start's error is the one to tell
        log.warning("%s: stopping after a failed start failed too", name, exc_info=True)


# -- health and metrics --------------------------------------------------------------------


def health(tasks: Supervisor, **fields) -> web.Response:
    """`fields` and {"ready": ..., "down": [task names]} as JSON; 503 while a task is down."""
    down = tasks.down()
    return web.json_response({**fields, "ready": not down, "down": down}, status=503 if down else 200)


def metrics(registry) -> web.Response:
    """The registry's metrics in Prometheus' text format."""
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def listen(app: web.Application, host: str, port: int, what: str) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: any free port); returns its runner (`cleanup()` stops
    it) and the port taken. A port that cannot be bound is a PortError naming `what`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise cannot_listen(what, host, port) from e  # asyncio's message repeats the address
    return runner, runner.addresses[0][1]


class MetricsServer:
    """Prometheus /metrics of `registry` on host:port from a thread; port -1: none, 0: any free port."""

    def __init__(self, registry, host: str, port: int):
        self.registry, self.host, self.port = registry, host, port
        self.server = None

    def start(self) -> int:
        """Listen (PortError names the port when it is taken); returns the port, -1 for none."""
        if self.port >= 0 and self.server is None:
            self.server = serve_metrics(self.registry, self.host, self.port)
            self.port = self.server.server_port
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics" if self.port >= 0 else ""

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:  # shutdown() waits for the serving thread's next poll
            await asyncio.to_thread(server.shutdown)
            server.server_close()

"""Long-lived asyncio tasks that never die silently.

`start(name, factory)` runs `await factory()` as a task of that name until `stop()`.
When the coroutine raises, its traceback is logged with the task's name, the failure is
counted in `vigil_task_failures_total{task}`, and a fresh coroutine from `factory` runs
after a backoff: `min_backoff` seconds, doubled with each failure in a row up to
`max_backoff`; a run that lasted longer than `max_backoff` starts the doubling again. So
a factory must make a coroutine that can take over where the failed one stopped (a loop
over a consumer that the service owns, not one that the coroutine opens and closes).

From a failure until its restart the task is down: `vigil_task_up{task}` is 0, `down()`
names it and `ready` is False, so health checks can answer "not ready" and say which.
`on_change(supervisor)`, if given, is called each time `ready` changes. A coroutine that
returns has done its work: its task ends, is not restarted and is not down. `stop()`
cancels every task (`stop(name, ...)` only those) and waits until each has ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, registry: CollectorRegistry | None = None, min_backoff: float = 0.1,
                 max_backoff: float = 30.0, on_change: Callable[["Supervisor"], None] | None = None):
        r = registry if registry is not None else CollectorRegistry()
        self.failures = Counter("vigil_task_failures", "Exceptions that ended a supervised task, which was "
                                "then restarted", ("task",), registry=r)
        self.up = Gauge("vigil_task_up", "1 while a supervised task runs, 0 while it waits to be restarted "
                        "after a failure", ("task",), registry=r)
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.on_change = on_change
        self.tasks: dict[str, asyncio.Task] = {}
        self._down: set[str] = set()

    def start(self, name: str, factory: Callable[[], Awaitable[None]]) -> asyncio.Task:
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already supervised")
        self.failures.labels(name)  # shown at 0 before any failure
        self.up.labels(name).set(1)
        task = self.tasks[name] = asyncio.create_task(self._run(name, factory), name=name)
        task.add_done_callback(lambda t: self.tasks.pop(name) if self.tasks.get(name) is t else None)
        return task

    async def stop(self, *names: str) -> None:
        tasks = [t for n, t in self.tasks.items() if not names or n in names]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def down(self) -> list[str]:
        return sorted(self._down)

    @property
    def ready(self) -> bool:
        return not self._down

    async def _run(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        in_a_row = 0
        try:
            while True:
                began = loop.time()
                try:
                    await factory()
                    return
                except asyncio.CancelledError as exc:
                    if asyncio.current_task().cancelling():
                        raise
                    error = exc  # cancelled from inside, e.g. by a library's own cancelled retry
                except Exception as exc:
                    error = exc
                in_a_row = 1 if loop.time() - began > self.max_backoff else in_a_row + 1
                delay = min(self.max_backoff, self.min_backoff * 2 ** (in_a_row - 1))
                log.error("task %s failed (%d in a row); restarting it in %.1fs", name, in_a_row, delay,
                          exc_info=error)
                self.failures.labels(name).inc()
                self._mark(name, down=True)
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._mark(name, down=False)
                log.info("task %s restarted", name)
        finally:
            self.up.remove(name)

    def _mark(self, name: str, down: bool) -> None:
        was = self.ready
        (self._down.add if down else self._down.discard)(name)
        self.up.labels(name).set(0 if down else 1)
        if self.ready != was and self.on_change is not None:
            self.on_change(self)

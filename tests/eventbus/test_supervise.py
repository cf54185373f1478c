"""The supervisor of long-lived tasks: a failure is logged with its traceback, counted,
shown as down while the task waits for its restart, and the task goes on working."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from eventbus.supervise import Supervisor
from tests.helpers.waiting import until


def test_a_failing_task_is_logged_counted_down_then_restarted(caplog):
    async def main():
        registry = CollectorRegistry()
        changes = []
        sup = Supervisor(registry, min_backoff=0.05, max_backoff=1.0, on_change=lambda s: changes.append(s.ready))
        fail = asyncio.Event()
        ticks = []

        async def work():
            while True:
                if fail.is_set():
                    raise RuntimeError("boom in work")
                ticks.append(1)
                await asyncio.sleep(0.01)

        sup.start("work", work)
        value = lambda name: registry.get_sample_value(name, {"task": "work"})  # noqa: E731
        assert value("vigil_task_failures_total") == 0 and value("vigil_task_up") == 1
        await until(lambda: ticks, 10, "the task to run")
        fail.set()
        await until(lambda: not sup.ready, 10, "the task to be down")
        assert sup.down() == ["work"] and value("vigil_task_up") == 0
        await until(lambda: value("vigil_task_failures_total") >= 2, 10, "a second failure")
        fail.clear()
        ticks.clear()
        await until(lambda: ticks and sup.ready, 10, "the task to work again")
        assert value("vigil_task_up") == 1 and changes[0] is False and changes[-1] is True
        await sup.stop()
        assert not sup.tasks and value("vigil_task_up") is None

    with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        asyncio.run(main())
    failed = [r for r in caplog.records if "task work failed" in r.getMessage()]
    assert failed and "boom in work" in caplog.text and "Traceback" in caplog.text
    assert "1 in a row" in failed[0].getMessage() and "2 in a row" in failed[1].getMessage()


def test_backoff_doubles_and_is_bounded():
    async def main():
        sup = Supervisor(min_backoff=0.02, max_backoff=0.08)
        starts = []

        async def crash():
            starts.append(asyncio.get_running_loop().time())
            raise ValueError("always")

        sup.start("crash", crash)
        await until(lambda: len(starts) >= 6, 10, "six starts")
        await sup.stop()
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08
        assert all(g < 0.5 for g in gaps), gaps  # bounded by max_backoff, with room for a busy machine

    asyncio.run(main())


def test_a_task_that_returns_ends_and_stop_cancels_the_others():
    async def main():
        sup = Supervisor()
        done, cancelled = asyncio.Event(), asyncio.Event()

        async def once():
            done.set()

        async def forever():
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        sup.start("once", once)
        sup.start("forever", forever)
        await asyncio.wait_for(done.wait(), 5)
        await until(lambda: "once" not in sup.tasks, 10, "the finished task to leave")
        assert sup.ready and list(sup.tasks) == ["forever"]
        with pytest.raises(ValueError, match="already supervised"):
            sup.start("forever", forever)
        await sup.stop("forever")
        assert cancelled.is_set() and not sup.tasks

    asyncio.run(main())


def test_a_cancel_from_inside_is_a_failure_not_an_end(caplog):
    async def main():
        registry = CollectorRegistry()
        sup = Supervisor(registry, min_backoff=0.01)
        runs = []

        async def cancelled_inside():
            runs.append(1)
            if len(runs) == 1:
                raise asyncio.CancelledError()  # as a library's own cancelled retry does
            await asyncio.Event().wait()

        sup.start("inner", cancelled_inside)
        await until(lambda: len(runs) == 2, 10, "the restart")
        assert registry.get_sample_value("vigil_task_failures_total", {"task": "inner"}) == 1
        await sup.stop()

    with caplog.at_level(logging.ERROR, logger="eventbus.supervise"):
        asyncio.run(main())
    assert "task inner failed" in caplog.text

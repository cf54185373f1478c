"""Clocks. Every timer of the alerting core (for, keep_firing_for, group_wait,
group_interval, repeat_interval, throttling windows, silence expiry) reads one of these,
so a test drives them exactly with ManualClock instead of sleeping."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, t: float) -> None:
        delay = t - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """Time moves only when `advance` or `set` is called; sleepers wake in deadline order."""

    def __init__(self, start: float = 1_700_000_000.0):
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError("a ManualClock does not go backwards")
        self._now = float(t)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def advance(self, seconds: float) -> None:
        self.set(self._now + seconds)

    async def sleep_until(self, t: float) -> None:
        if t <= self._now:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (t, next(self._seq), fut))
        await fut

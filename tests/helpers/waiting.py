"""Waiting on a condition with a deadline, from a test's thread or its event loop. Tests
never sleep a fixed time to let something happen; they wait for it to have happened."""

from __future__ import annotations

import asyncio
import inspect
import time


def wait_until(condition, timeout: float, what: str, every: float = 0.02):
    """condition()'s first true value; fails the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(every)
    return got


async def until(condition, timeout: float, what: str, every: float = 0.02):
    """wait_until for the event loop: condition may be a coroutine function."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = condition()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(every)

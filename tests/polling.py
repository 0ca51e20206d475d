"""Waiting for something to happen in a test: poll a condition until it holds, failing at a deadline. The one
way tests synchronise (tests/unit/test_no_clocks.py forbids fixed sleeps and wall-clock bounds)."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


def _failure(what: str | Callable[[], str], timeout: float) -> str:
    return f"not within {timeout} s: {what() if callable(what) else what}"


def until(condition: Callable[[], object], what: str | Callable[[], str], timeout: float = 60,
          every: float = 0.005) -> None:
    """Poll ``condition`` every ``every`` seconds until it is true; fail after ``timeout`` seconds, saying
    ``what`` was awaited (a callable is asked only then, for a message that shows the state at the deadline)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, _failure(what, timeout)
        time.sleep(every)


async def until_async(condition: Callable[[], object], what: str | Callable[[], str], timeout: float = 60,
                      every: float = 0.005) -> None:
    """:func:`until` for a coroutine: the event loop keeps running between polls."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, _failure(what, timeout)
        await asyncio.sleep(every)

"""Forward passes of several models on one device, one at a time and in turn.

Each model has its own engine thread, scheduler and budgets. Before a step goes to the device, its engine takes a
turn here: turns are granted one at a time, in the order they were asked for. An engine that finished a step and
asks again queues behind every engine already waiting, so models with waiting work alternate step by step and
none starves another; a model with nothing queued never asks and costs nothing. Two passes at once would only
thrash the device (its memory, its caches, the CPU's cores). On CUDA a turn covers a step's launch: the kernels
of every model go to the device's one default stream, which runs them in the order the turns were granted.

Pure threading: no torch, no asyncio.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator


class DeviceTurns:
    def __init__(self, on_grant: Callable[[str, float], None] | None = None) -> None:
        """``on_grant(name, waited_s)``: called as each turn starts (metrics, tests)."""
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._busy = False
        self._on_grant = on_grant

    @contextmanager
    def turn(self, name: str) -> Iterator[None]:
        """Hold the device for one step of model ``name``."""
        ticket = object()
        asked = time.perf_counter()
        with self._cond:
            self._waiting.append(ticket)
            while self._busy or self._waiting[0] is not ticket:
                self._cond.wait()
            self._waiting.popleft()
            self._busy = True
        try:
            if self._on_grant is not None:
                self._on_grant(name, time.perf_counter() - asked)
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

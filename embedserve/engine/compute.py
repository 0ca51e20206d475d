"""The one thread that runs the process's CPU compute: every CPU model's loading, warm-up and forward passes.

torch's CPU build parallelises through GNU OpenMP, which gives every thread that starts a parallel region its own
team of worker threads, kept for the life of that thread. Once the process holds more such workers than it has
cores (the main thread's team from loading, plus an engine thread's), OpenMP stops spinning between regions and
puts its workers to sleep after ~100 spins: every one of a forward pass's thousands of regions then pays a
wake-up. Measured on a 2-core host: the same 13 MiniLM bf16 steps took 1.65 s on the thread that had loaded the
model and 2.05-2.30 s on an engine thread next to it; an engine fed 19 requests of 32 texts at once went from
2.3 s to 1.8-2.0 s once the main thread had no team.

So on the CPU exactly one thread runs torch's parallel work: this one. The engine threads of every CPU model keep
their scheduling, batching and answering, and hand each step's device work here (their steps already take turns,
see :mod:`embedserve.engine.turns`); loading and warm-up come here too, so the caller's thread (the main thread
of a server) never starts a team. CUDA models are untouched: their engine threads launch their own kernels.
"""

from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from embedserve.engine.device import keep_blocks_on_the_heap

T = TypeVar("T")


class _Thread:
    """A daemon thread running submitted calls one at a time, in order. A daemon, and no executor: an engine
    thread still draining at interpreter exit must not find the door shut (an executor refuses work once exit
    has begun)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="embedserve-compute", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            fut, fn, args, kw = self.jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as exc:  # the caller re-raises it; this thread goes on
                fut.set_exception(exc)


_lock = threading.Lock()
_compute: _Thread | None = None


def _started() -> _Thread:
    global _compute
    with _lock:
        if _compute is None:
            # Before the thread exists: it then shares the main heap instead of an arena of its own (see
            # keep_blocks_on_the_heap), like every thread started after it.
            keep_blocks_on_the_heap()
            _compute = _Thread()
        return _compute


def on_compute_thread() -> bool:
    return _compute is not None and threading.current_thread() is _compute.thread


def submit(fn: Callable[..., T], *args: Any, **kw: Any) -> Future:
    """Queue ``fn(*args, **kw)`` on the compute thread; its future (``asyncio.wrap_future`` awaits it)."""
    fut: Future = Future()
    _started().jobs.put((fut, fn, args, kw))
    return fut


def call(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """``fn(*args, **kw)`` on the compute thread, waiting for it; its exception is raised here. Called from the
    compute thread itself, it runs inline (a nested call would otherwise wait for itself)."""
    if on_compute_thread():
        return fn(*args, **kw)
    return submit(fn, *args, **kw).result()


class OnComputeThread:
    """``target`` with each of its methods called on the compute thread; other attributes read through."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr
        return functools.partial(call, attr)

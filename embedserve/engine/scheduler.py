"""Continuous-batching scheduler: synchronous data in, data out. No torch, no asyncio, no threads.

Every input of every request is its own :class:`Entry`. ``schedule()`` packs waiting entries into one
step: the oldest waiting entry always goes first (so nothing starves), then later entries in arrival
order fill what is left of the token budget (``max_batch_tokens``) and the sequence budget
(``max_batch_requests``). ``complete()`` retires a step and reports which requests are finished.
A request with more inputs than one step holds simply spans several steps.

The caller owns locking: the engine calls these methods under one lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from embedserve.errors import ConfigError, Overloaded

# How far past the head schedule() looks for entries that still fit. Bounds the cost of a step when
# the head of the queue is full of entries too long for the remaining budget.
_LOOKAHEAD = 4096


@dataclass(slots=True)
class Entry:
    request_id: int
    index: int  # position of this input within its request
    num_tokens: int
    payload: Any = None  # opaque to the scheduler (the token ids)


@dataclass(slots=True)
class Step:
    entries: list[Entry]

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.entries)


@dataclass(slots=True)
class _Request:
    total: int
    remaining: int
    waiting: int
    running: int = 0
    aborted: bool = False


@dataclass
class SchedulerStats:
    waiting_inputs: int = 0
    waiting_tokens: int = 0
    running_inputs: int = 0
    steps: int = 0
    dropped_inputs: int = 0


class Scheduler:
    def __init__(self, *, max_batch_tokens: int, max_batch_requests: int, max_queue: int) -> None:
        if min(max_batch_tokens, max_batch_requests, max_queue) < 1:
            raise ConfigError("scheduler budgets must be positive")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        # Waiting entries in arrival order, keyed by (request_id, index) so abort() is O(own inputs).
        self._waiting: OrderedDict[tuple[int, int], Entry] = OrderedDict()
        self._requests: dict[int, _Request] = {}
        self.stats = SchedulerStats()

    # -- queries --------------------------------------------------------------------------------------
    def has_waiting(self) -> bool:
        return bool(self._waiting)

    @property
    def queued_inputs(self) -> int:
        """Inputs waiting or running: what ``max_queue`` bounds."""
        return self.stats.waiting_inputs + self.stats.running_inputs

    # -- commands -------------------------------------------------------------------------------------
    def add(self, request_id: int, entries: list[Entry]) -> None:
        """Queue all inputs of one request, or none of them (raises :class:`Overloaded`)."""
        if not entries:
            raise ValueError("this is a bug: a request with no inputs reached the scheduler")
        if request_id in self._requests:
            raise ValueError(f"this is a bug: request {request_id} added twice")
        if sorted(e.index for e in entries) != list(range(len(entries))):
            raise ValueError("this is a bug: entry indexes must be 0..n-1, each once")
        for e in entries:
            if e.num_tokens > self.max_batch_tokens:
                raise ValueError(
                    f"this is a bug: an input of {e.num_tokens} tokens exceeds max_batch_tokens="
                    f"{self.max_batch_tokens} and can never be scheduled"
                )
        if self.queued_inputs + len(entries) > self.max_queue:
            raise Overloaded(
                f"The server's queue is full ({self.queued_inputs} of {self.max_queue} inputs queued); "
                "retry after a moment."
            )
        self._requests[request_id] = _Request(total=len(entries), remaining=len(entries), waiting=len(entries))
        for e in entries:
            self._waiting[(request_id, e.index)] = e
            self.stats.waiting_tokens += e.num_tokens
        self.stats.waiting_inputs += len(entries)

    def abort(self, request_id: int) -> int:
        """Drop a request's waiting inputs; its running ones finish but are discarded. Returns inputs dropped."""
        req = self._requests.get(request_id)
        if req is None:
            return 0
        dropped = 0
        if req.waiting:
            for i in range(req.total):
                e = self._waiting.pop((request_id, i), None)
                if e is not None:
                    dropped += 1
                    self.stats.waiting_tokens -= e.num_tokens
        self.stats.waiting_inputs -= dropped
        self.stats.dropped_inputs += dropped
        req.waiting -= dropped
        if req.running:
            req.aborted = True
        else:
            del self._requests[request_id]
        return dropped

    def schedule(self) -> Step | None:
        """Take the next step's entries off the queue, or None when nothing waits."""
        if not self._waiting:
            return None
        budget = self.max_batch_tokens
        picked: list[Entry] = []
        for n, (key, e) in enumerate(self._waiting.items()):
            if n >= _LOOKAHEAD or len(picked) >= self.max_batch_requests or budget == 0:
                break
            if e.num_tokens <= budget:
                picked.append(e)
                budget -= e.num_tokens
        for e in picked:
            del self._waiting[(e.request_id, e.index)]
            req = self._requests[e.request_id]
            req.waiting -= 1
            req.running += 1
            self.stats.waiting_tokens -= e.num_tokens
        self.stats.waiting_inputs -= len(picked)
        self.stats.running_inputs += len(picked)
        self.stats.steps += 1
        return Step(picked)

    def complete(self, step: Step) -> list[int]:
        """Retire a finished (or failed) step. Returns the requests that have no inputs left to run."""
        finished = []
        for e in step.entries:
            req = self._requests.get(e.request_id)
            if req is None:
                raise ValueError(f"this is a bug: step entry for unknown request {e.request_id}")
            req.running -= 1
            req.remaining -= 1
            self.stats.running_inputs -= 1
            if req.aborted and req.running == 0 and req.waiting == 0:
                del self._requests[e.request_id]
            elif req.remaining == 0:
                del self._requests[e.request_id]
                finished.append(e.request_id)
        return finished

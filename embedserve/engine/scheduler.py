"""Continuous-batching scheduler: synchronous data in, data out. No torch, no asyncio, no threads.

Every input of every request is its own :class:`Entry`. ``schedule()`` packs work into one step: entries by
priority (0-999, lower first), then arrival, fill the token budget (``max_batch_tokens``) and the sequence budget
(``max_batch_requests``). With one priority this is plain arrival order.

A share keeps low priorities from starving: while the oldest waiting input is not the first by priority, it earns
``priority_share`` of a step's tokens per step, and goes into the step first once that credit covers it. So a
low-priority input waits about as long as first-come-first-served would make it wait (the older inputs ahead of it,
then a step or so), and higher priorities keep the rest: the share takes its turn at most once every
``1 / priority_share`` steps for an input as long as a step.
``complete()`` retires a step and reports which requests are finished. A request with more inputs than one
step holds simply spans several steps.

Chunked prefill (causal models only, ``chunk_tokens`` set): an input longer than ``chunk_tokens`` runs as
consecutive chunks, one per step, each attending to the cached keys of the earlier ones. Its key cache is
reserved whole when its first chunk is scheduled and counted against ``max_kv_tokens``; when that is full,
new long inputs wait while short ones keep flowing. In-progress chunks take at most half of a step's token
budget while anything else waits, so short inputs are never queued behind a whole long one.

The caller owns locking: the engine calls these methods under one lock.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from embedserve.config import DEFAULT_BATCH_TOKENS, SchedulerConfig
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
    done: int = 0  # tokens already run (chunked inputs)
    arrival: float = 0.0  # when its request was queued (the caller's monotonic clock; set by add)


@dataclass(slots=True)
class Work:
    """One input's part of a step: the whole input, or one chunk of a long one."""

    entry: Entry
    start: int
    length: int

    @property
    def final(self) -> bool:
        return self.start + self.length == self.entry.num_tokens

    @property
    def chunked(self) -> bool:
        return self.length != self.entry.num_tokens


@dataclass(slots=True)
class Step:
    items: list[Work]

    @property
    def entries(self) -> list[Entry]:
        return [w.entry for w in self.items]

    @property
    def num_tokens(self) -> int:
        return sum(w.length for w in self.items)


@dataclass(slots=True)
class _Request:
    total: int
    remaining: int
    waiting: int
    running: int = 0  # entries in the step now
    aborted: bool = False
    priority: int = 0


@dataclass
class SchedulerStats:
    waiting_inputs: int = 0
    waiting_tokens: int = 0
    running_inputs: int = 0  # started and not finished: in a step, or a long input between its chunks
    kv_tokens: int = 0  # key-cache tokens reserved by long inputs in progress
    steps: int = 0
    dropped_inputs: int = 0
    waiting_by_priority: dict[int, int] = field(default_factory=dict)  # waiting inputs per priority level


@dataclass(frozen=True)
class Budgets:
    """A model's token budgets, resolved from the flags (:func:`resolve_budgets`)."""

    max_batch_tokens: int
    chunk_tokens: int | None  # None: every input runs in one pass
    max_kv_tokens: int | None  # with chunk_tokens only


def resolve_budgets(config: SchedulerConfig, *, device_type: str, max_length: int, can_chunk: bool) -> Budgets:
    """The budgets a model runs under: the flags, or defaults sized from the device and the model.

    ``max_length``: the longest input the model takes; ``can_chunk``: whether it runs long inputs as chunks over
    a key cache (causal models). A budget that could never schedule the longest input is a :class:`ConfigError`
    naming the flag to raise."""
    max_batch_tokens = config.max_batch_tokens or DEFAULT_BATCH_TOKENS.get(device_type, DEFAULT_BATCH_TOKENS["cpu"])
    if can_chunk and config.chunk_tokens != 0:
        # Causal models run long inputs as chunks over a key cache: any length up to the model's.
        chunk_tokens = config.chunk_tokens or max(1, max_batch_tokens // 8)
        max_kv_tokens = config.max_kv_tokens or max(4 * max_batch_tokens, max_length)
        if max_kv_tokens < max_length:
            raise ConfigError(
                f"max_kv_tokens={max_kv_tokens} is below the model's maximum input length "
                f"{max_length}: the longest input could never hold its key cache. Raise --max-kv-tokens "
                f"to at least {max_length}."
            )
        return Budgets(max_batch_tokens, chunk_tokens, max_kv_tokens)
    if max_batch_tokens < max_length:
        raise ConfigError(
            f"max_batch_tokens={max_batch_tokens} is below the model's maximum input length "
            f"{max_length}; this model attends both ways, so an input runs in one pass and one that "
            f"long could never be scheduled. Raise --max-batch-tokens to at least {max_length}, or "
            f"lower --max-input-tokens."
        )
    return Budgets(max_batch_tokens, None, None)


class Scheduler:
    def __init__(
        self,
        *,
        max_batch_tokens: int,
        max_batch_requests: int,
        max_queue: int,
        chunk_tokens: int | None = None,
        max_kv_tokens: int | None = None,
        priority_share: float = 0.125,
    ) -> None:
        if min(max_batch_tokens, max_batch_requests, max_queue) < 1:
            raise ConfigError("scheduler budgets must be positive")
        if not 0 <= priority_share <= 1:
            raise ConfigError(f"the priority share must be from 0 to 1 (of a step's tokens), got {priority_share}")
        if chunk_tokens is not None and not 1 <= chunk_tokens <= max_batch_tokens // 2:
            raise ConfigError(
                f"chunk size {chunk_tokens} must be between 1 and half of max_batch_tokens ({max_batch_tokens // 2})"
            )
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        self.chunk_tokens = chunk_tokens
        self.max_kv_tokens = max_kv_tokens if chunk_tokens is not None else None
        self.priority_share = priority_share
        self._credit = 0.0  # tokens the oldest waiting input has earned while passed over by priority
        # Waiting entries per priority, each level in arrival order, keyed by (request_id, index) so abort() is
        # O(own inputs).
        self._waiting: dict[int, OrderedDict[tuple[int, int], Entry]] = {}
        # Long inputs between chunks, in the order they started.
        self._active: OrderedDict[tuple[int, int], Entry] = OrderedDict()
        self._requests: dict[int, _Request] = {}
        self._released: list[tuple[int, int]] = []
        self.stats = SchedulerStats()

    # -- queries --------------------------------------------------------------------------------------
    def has_waiting(self) -> bool:
        return bool(self._waiting) or bool(self._active)

    def _by_priority(self):
        """Every waiting entry, by priority, then arrival."""
        for priority in sorted(self._waiting):
            yield from self._waiting[priority].values()

    def _oldest(self) -> Entry | None:
        """The waiting entry that arrived first, whatever its priority (each level's first is its oldest)."""
        heads = [next(iter(level.values())) for level in self._waiting.values()]
        return min(heads, key=lambda e: (e.arrival, e.request_id, e.index), default=None)

    @property
    def queued_inputs(self) -> int:
        """Inputs waiting or running: what ``max_queue`` bounds."""
        return self.stats.waiting_inputs + self.stats.running_inputs

    def take_released(self) -> list[tuple[int, int]]:
        """(request id, input index) of long inputs whose key cache can be freed now (finished or aborted)."""
        out, self._released = self._released, []
        return out

    def _longest_allowed(self) -> int:
        return self.max_batch_tokens if self.chunk_tokens is None else self.max_kv_tokens

    def _is_long(self, e: Entry) -> bool:
        return self.chunk_tokens is not None and e.num_tokens > self.chunk_tokens

    # -- commands -------------------------------------------------------------------------------------
    def add(self, request_id: int, entries: list[Entry], *, priority: int = 0, now: float = 0.0) -> None:
        """Queue all inputs of one request, or none of them (raises :class:`Overloaded`). ``priority``: 0-999,
        lower first; ``now``: its arrival, in seconds of a monotonic clock (the caller's)."""
        if not entries:
            raise ValueError("this is a bug: a request with no inputs reached the scheduler")
        if request_id in self._requests:
            raise ValueError(f"this is a bug: request {request_id} added twice")
        if sorted(e.index for e in entries) != list(range(len(entries))):
            raise ValueError("this is a bug: entry indexes must be 0..n-1, each once")
        limit = self._longest_allowed()
        for e in entries:
            if e.num_tokens > limit:
                raise ValueError(
                    f"this is a bug: an input of {e.num_tokens} tokens exceeds the scheduler's limit of {limit} "
                    "and can never be scheduled"
                )
        if self.queued_inputs + len(entries) > self.max_queue:
            raise Overloaded(
                f"The server's queue is full ({self.queued_inputs} of {self.max_queue} inputs queued); "
                "retry after a moment."
            )
        self._requests[request_id] = _Request(total=len(entries), remaining=len(entries), waiting=len(entries),
                                              priority=priority)
        level = self._waiting.setdefault(priority, OrderedDict())
        for e in entries:
            e.arrival = now
            level[(request_id, e.index)] = e
            self.stats.waiting_tokens += e.num_tokens
        self.stats.waiting_inputs += len(entries)
        by = self.stats.waiting_by_priority
        by[priority] = by.get(priority, 0) + len(entries)

    def _left_waiting(self, priority: int, n: int) -> None:
        """``n`` inputs of a level left the line: drop the level once it is empty."""
        by = self.stats.waiting_by_priority
        by[priority] -= n
        if not by[priority]:
            del by[priority]
        if not self._waiting[priority]:
            del self._waiting[priority]

    def _release(self, e: Entry) -> None:
        self.stats.kv_tokens -= e.num_tokens
        self._released.append((e.request_id, e.index))

    def abort(self, request_id: int) -> int:
        """Drop a request's waiting inputs and its long inputs between chunks (their key cache is released);
        inputs in the step now finish but are discarded. Returns inputs dropped."""
        req = self._requests.get(request_id)
        if req is None:
            return 0
        dropped = 0
        level = self._waiting.get(req.priority, {})
        unqueued = 0
        for i in range(req.total):
            key = (request_id, i)
            e = level.pop(key, None)
            if e is not None:
                unqueued += 1
                dropped += 1
                req.waiting -= 1
                self.stats.waiting_inputs -= 1
                self.stats.waiting_tokens -= e.num_tokens
                continue
            e = self._active.pop(key, None)
            if e is not None:
                dropped += 1
                self.stats.running_inputs -= 1
                self._release(e)
        if unqueued:
            self._left_waiting(req.priority, unqueued)
        self.stats.dropped_inputs += dropped
        if req.running:
            req.aborted = True
        else:
            del self._requests[request_id]
        return dropped

    def schedule(self) -> Step | None:
        """Take the next step's work off the queue, or None when nothing waits."""
        if not self._waiting and not self._active:
            return None
        budget = self.max_batch_tokens
        slots = self.max_batch_requests
        items: list[Work] = []
        # 1. Long inputs in progress: their next chunk, within half the budget while others wait.
        cap = budget // 2 if self._waiting else budget
        used = 0
        for key, e in list(self._active.items()):
            n = min(self.chunk_tokens, e.num_tokens - e.done)
            if used + n > cap or len(items) >= slots:
                break
            del self._active[key]
            self._requests[e.request_id].running += 1
            items.append(Work(e, e.done, n))
            used += n
        budget -= used
        started: list[Entry] = []

        def take(e: Entry) -> int:
            """``e`` into the step if it fits (a long one only when its key cache fits): its tokens, else 0."""
            nonlocal budget
            if self._is_long(e):
                if self.stats.kv_tokens + e.num_tokens > self.max_kv_tokens:
                    return 0  # waits for key cache; short inputs behind it go on
                n = self.chunk_tokens
            else:
                n = e.num_tokens
            if n > budget:
                return 0
            if self._is_long(e):
                self.stats.kv_tokens += e.num_tokens
            items.append(Work(e, 0, n))
            started.append(e)
            budget -= n
            return n

        # 2. The share: the oldest input, when priority passes it over, once its credit covers it; then the rest by
        # priority, then arrival.
        oldest = self._oldest()
        by_priority = self._by_priority()
        first = next(by_priority, None)
        shared = None
        if oldest is None or oldest is first:
            self._credit = 0.0
        elif self.priority_share:
            self._credit = min(self._credit + self.priority_share * self.max_batch_tokens, self.max_batch_tokens)
            if len(items) < slots and self._credit >= min(oldest.num_tokens, self.chunk_tokens or oldest.num_tokens):
                taken = take(oldest)
                if taken:
                    self._credit -= taken
                    shared = oldest
        for scanned, e in enumerate(itertools.chain(() if first is None else (first,), by_priority)):
            if scanned >= _LOOKAHEAD or len(items) >= slots or budget == 0:
                break
            if e is not shared:
                take(e)
        for e in started:
            req = self._requests[e.request_id]
            del self._waiting[req.priority][(e.request_id, e.index)]
            self._left_waiting(req.priority, 1)
            req.waiting -= 1
            req.running += 1
            self.stats.waiting_tokens -= e.num_tokens
        self.stats.waiting_inputs -= len(started)
        self.stats.running_inputs += len(started)
        if not items:
            return None
        self.stats.steps += 1
        return Step(items)

    def complete(self, step: Step) -> list[int]:
        """Retire a finished (or failed) step. Returns the requests that have no inputs left to run."""
        finished = []
        for w in step.items:
            e = w.entry
            req = self._requests.get(e.request_id)
            if req is None:
                raise ValueError(f"this is a bug: step entry for unknown request {e.request_id}")
            req.running -= 1
            e.done = w.start + w.length
            if not w.final and not req.aborted:
                self._active[(e.request_id, e.index)] = e  # its next chunk goes in a later step
                continue
            if self._is_long(e):
                self._release(e)
            self.stats.running_inputs -= 1
            if req.aborted:
                if not w.final:
                    self.stats.dropped_inputs += 1
                if req.running == 0:
                    del self._requests[e.request_id]
                continue
            req.remaining -= 1
            if req.remaining == 0:
                del self._requests[e.request_id]
                finished.append(e.request_id)
        return finished

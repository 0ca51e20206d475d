"""The engine thread: one per model, it owns the model's device work.

It takes a step from the scheduler, launches it, writes each row into its request's result and resolves finished
requests on their event loop with ``loop.call_soon_threadsafe``. The thread blocks on a condition variable while
the queue is empty: no timers, no polling, and whatever arrives during a forward pass is packed into the next one.

On CUDA the thread keeps two steps in flight: while the device runs one, the next is packed, staged and queued
behind it, and the first one's results are handed back when its event fires. On the CPU a launch computes the
step, so one step at a time.

Faults (see :mod:`embedserve.engine.faults`): an ordinary failure fails exactly its step's requests (500);
out-of-memory splits the step and retries the parts (:func:`run_in_parts`), refusing only an input that does not
fit alone (400); a fatal device error stops the engine: the failing step's requests get 500, every other request
held gets 503, new ones 503, and ``on_fatal`` tells the server, which turns unhealthy and exits for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from embedserve.engine.compute import OnComputeThread
from embedserve.engine.device import bind_thread, release_cached_memory, release_host_memory
from embedserve.engine.faults import classify, injected, run_in_parts
from embedserve.engine.interface import EmbedResult, StepObserver, StepSpan, Timings
from embedserve.engine.loading import Loaded
from embedserve.engine.runner import Chunk, StepHandle
from embedserve.engine.scheduler import Entry, Step, Work
from embedserve.engine.turns import DeviceTurns
from embedserve.errors import EmbedServeError, EngineError, EngineFailed, InputTooLarge, ShuttingDown
from embedserve.kernels.pool_encode import ENCODING_NAMES
from embedserve.models.lexical import lexical_rows

log = logging.getLogger(__name__)

# An idle CPU engine hands its heap's free pages back at most this often (see device.release_host_memory).
TRIM_INTERVAL_S = 2.0


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    rows: torch.Tensor  # [n, D] float32
    dims: int
    normalize: bool
    token_counts: list[int]
    encoded: list[bytes] | None  # per input, when the request asked for an encoding
    encoding: int  # its pool_encode.ENCODINGS code (0: none)
    ranges: torch.Tensor | None  # [2, dims]: int8 / uint8's calibrated ranges
    tokenize_s: float
    queued_at: float
    started_at: float | None = None
    type_starts: list[int] | None = None  # pairs: where each input's second text starts
    spans: list[list[tuple[int, int, int]]] | None = None  # late chunking: per input run, (lo, hi, chunk)
    sparse: list | None = None  # SPLADE, or bge-m3 asked for them: per input, (ids, weights) of its nonzero weights
    sums: torch.Tensor | None = None  # late chunking: [chunks, H] fp32, each chunk's sum of states so far
    multi: list | None = None  # per-token vectors asked for: per input, its [n, C] vectors
    multi_mode: int = 0  # the runner's per-token vector modes (1: every token's, 2: but the skiplist's)
    tails: list[int] | None = None  # a ColBERT model's queries: per input, its hidden tail
    steps: list[StepSpan] = field(default_factory=list)  # the forward steps it took part in (for its trace)


@dataclass
class _InFlight:
    step: Step
    plan: list[_Pending | None]
    handle: StepHandle
    started: float


class _Fatal(Exception):
    """A device error that poisons the CUDA context, with the steps it took down."""

    def __init__(self, error: BaseException, failing: list[Step]) -> None:
        super().__init__(str(error))
        self.error = error
        self.failing = failing


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _answer(p: _Pending, setter, value: object) -> None:
    """Resolve a request's future on its own event loop, from the engine thread. A loop that has closed in the
    meantime has nobody left to answer: that must not take the engine thread down."""
    try:
        p.loop.call_soon_threadsafe(setter, p.future, value)
    except RuntimeError:
        log.debug("a request's event loop closed before its answer was ready")


class Worker:
    """The engine thread of one model, and the requests it holds."""

    def __init__(self, loaded: Loaded, *, name: str, observer: StepObserver, fault_kind: str,
                 on_fatal: Callable[[BaseException], None] | None = None, turns: DeviceTurns | None = None) -> None:
        """``on_fatal``: called from the engine thread once it has stopped for good (a device error that poisons
        the CUDA context, or a bug that killed the thread). ``turns``: shared by the engines of several models on
        one device, so that their steps go to it one at a time, in turn; ``name``: this model's name there."""
        self.runner, self.scheduler, self.device = loaded.runner, loaded.scheduler, loaded.device
        if self.device.type == "cpu":
            self.runner = OnComputeThread(loaded.runner)  # the step's compute runs there (engine.compute)
        self.dimensions = loaded.model.dimensions
        self.max_batch_tokens = loaded.budgets.max_batch_tokens
        self.token_types = loaded.token_types  # pairs carry token types into the step
        self.sparse = loaded.model.sparse is not None  # SPLADE: the rows are sparse only
        self.lexical = loaded.model.lexical is not None  # bge-m3: each step also weighs its tokens
        colbert = loaded.model.colbert
        self.colbert = colbert is not None  # per-token vectors for the inputs that ask
        self.pylate = self.colbert and colbert.pylate is not None  # a ColBERT model: no pooled rows
        self.name = name
        self.observer = observer
        self._on_fatal = on_fatal
        self._turns = turns
        self._fault_ids, self._fault_kind = loaded.fault_ids, fault_kind
        self._depth = loaded.depth
        self._inflight: deque[_InFlight] = deque()  # engine thread only
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._steps_since_trim = 0  # CPU heap trimming when idle (engine thread only)
        self._trimmed_at = 0.0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_forever, name="embedserve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting work, finish every queued input, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def queue_stats(self) -> tuple[int, int, int, int]:
        """(waiting inputs, waiting tokens, running inputs, inputs dropped by cancellation so far)."""
        st = self.scheduler.stats
        with self._cond:
            return st.waiting_inputs, st.waiting_tokens, st.running_inputs, st.dropped_inputs

    def submit(self, loop: asyncio.AbstractEventLoop, ids: list[list[int]], type_starts: list[int] | None, *,
               dims: int, normalize: bool, encoding: int = 0, ranges: torch.Tensor | None = None,
               tokenize_s: float, queued_at: float, spans: list[list[tuple[int, int, int]]] | None = None,
               chunk_tokens: list[int] | None = None, sparse: bool = False, multi: int = 0,
               tails: list[int] | None = None, priority: int = 0) -> tuple[int, asyncio.Future]:
        """Queue every input of a request: (its id, the future its :class:`EmbedResult` resolves on ``loop``).
        ``encoding``: the bytes each row also comes with (an ENCODINGS code; 0 none), ``ranges`` for int8 / uint8.
        ``spans`` (late chunking): the inputs are one document's runs; the answer has a row per chunk, the mean
        of the states over its spans, and ``chunk_tokens`` as its token counts. ``sparse``: a bge-m3 request's
        inputs also get their lexical weights (a SPLADE model's always do, and only them); ``multi``: their
        per-token vectors (1: every token's; 2: but those of the model's skiplist); ``tails``: per input, its
        hidden tail (tokens no token attends to); ``priority``: 0-999, lower first (the scheduler's)."""
        fut = loop.create_future()
        rid = next(self._ids)
        entries = [Entry(rid, i, len(x), x) for i, x in enumerate(ids)]
        with self._cond:
            if self._stopping:
                raise ShuttingDown("The server is shutting down; retry on another replica.")
            if self._dead is not None:
                raise EngineFailed("The inference engine stopped after a device error; retry on another replica.")
            self.scheduler.add(rid, entries, priority=priority, now=time.monotonic())  # may raise Overloaded
            rows = len(chunk_tokens) if spans is not None else len(ids)
            width = 0 if self.sparse or self.pylate else self.dimensions  # SPLADE: kept as nonzeros only
            self._pending[rid] = _Pending(
                loop, fut, torch.empty(rows, width), dims, normalize,
                list(chunk_tokens) if spans is not None else [len(x) for x in ids],
                [b""] * rows if encoding else None, encoding, ranges, tokenize_s, queued_at,
                type_starts=type_starts if self.token_types else None, spans=spans,
                sparse=[None] * rows if self.sparse or (sparse and self.lexical) else None,
                multi=[None] * rows if multi and self.colbert else None, multi_mode=multi,
                tails=tails if tails and any(tails) else None,
            )
            self._cond.notify()
        return rid, fut

    def waiting_by_priority(self) -> dict[int, int]:
        """Inputs waiting, per priority level that has any."""
        with self._cond:
            return dict(self.scheduler.stats.waiting_by_priority)

    def cancel(self, rid: int) -> int:
        """Drop a request whose client went away: how many of its inputs were still queued."""
        with self._cond:
            dropped = self.scheduler.abort(rid)
            self._pending.pop(rid, None)
            self._cond.notify()  # the engine thread frees the key caches of its long inputs
        return dropped

    def _run_forever(self) -> None:
        try:
            bind_thread(self.device)
            while True:
                with self._cond:
                    while not self._inflight and not self.scheduler.has_waiting() and not self._stopping:
                        self.runner.free(self.scheduler.take_released())  # cancelled long inputs
                        if self._trim_due():
                            self._cond.release()  # submitters are not held up while the heap is trimmed
                            try:
                                self._trim()
                            finally:
                                self._cond.acquire()
                            continue
                        self._cond.wait()
                    self.runner.free(self.scheduler.take_released())
                    step = self.scheduler.schedule() if len(self._inflight) < self._depth else None
                    if step is None and not self._inflight:
                        if self.scheduler.has_waiting():
                            raise RuntimeError("this is a bug: inputs wait but none can be scheduled")
                        return  # stopping and drained
                    plan = [self._pending.get(e.request_id) for e in step.entries] if step is not None else []
                if step is not None:
                    self._launch(step, plan)
                    if len(self._inflight) < self._depth:
                        continue  # stage the next step while this one runs
                if self._inflight:
                    self._deliver(self._inflight.popleft())
        except _Fatal as fatal:
            self._die(fatal.error, fatal.failing)
        except BaseException as exc:  # the thread must never die silently with callers waiting
            log.exception("engine thread died")
            self._die(exc, [])

    def _trim_due(self) -> bool:
        """On the CPU, once idle after some work: at most every TRIM_INTERVAL_S seconds."""
        return (self.device.type == "cpu" and self._steps_since_trim > 0
                and time.monotonic() - self._trimmed_at >= TRIM_INTERVAL_S)

    def _trim(self) -> None:
        self._steps_since_trim = 0
        self._trimmed_at = time.monotonic()
        release_host_memory()

    def _step_args(self, items: Sequence[Work], plan: Sequence[_Pending | None], dims: int):
        inputs = [w.entry.payload[w.start : w.start + w.length] if w.chunked else w.entry.payload for w in items]
        chunks = [
            Chunk((w.entry.request_id, w.entry.index), w.start, w.entry.num_tokens, w.final) if w.chunked else None
            for w in items
        ]
        type_starts = None
        if self.token_types:
            type_starts = [p.type_starts[w.entry.index] if p and p.type_starts else len(x)
                           for w, p, x in zip(items, plan, inputs)]
        return (
            inputs,
            [p.dims if p else dims for p in plan],
            [p.normalize if p else False for p in plan],
            [p.encoding if p else 0 for p in plan],
            chunks if any(chunks) else None,
            type_starts,
            [p.ranges if p else None for p in plan],
            [p.spans[w.entry.index] if p and p.spans else None for w, p in zip(items, plan)],
            [p.multi_mode if p is not None and p.multi is not None else 0 for p in plan] if self.colbert else None,
            self.lexical and any(p is not None and p.sparse is not None for p in plan),
            [p.tails[w.entry.index] if p is not None and p.tails else 0 for w, p in zip(items, plan)]
            if any(p is not None and p.tails for p in plan) else None,
        )

    def _forward(self, inputs, dims, normalize, encodings, chunks, type_starts=None, ranges=None,
                 spans=None, multi=None, weigh=False, tails=None) -> StepHandle:
        if self._fault_ids is not None and self._fault_ids in inputs:
            raise injected(self._fault_kind)
        # With several models on the device, the others' steps wait for this one, in turn.
        with self._turns.turn(self.name) if self._turns is not None else contextlib.nullcontext():
            return self.runner.launch(inputs, dims, normalize, encodings, chunks, type_starts, ranges, spans, multi,
                                      weigh, tails)

    def _raise_if_fatal(self, exc: BaseException, step: Step) -> str:
        """The fault's kind; a fatal one ends the engine thread, taking ``step`` and every step in flight."""
        kind = classify(exc)
        if kind == "fatal":
            raise _Fatal(exc, [step] + [f.step for f in self._inflight]) from exc
        return kind

    def _launch(self, step: Step, plan: list[_Pending | None]) -> None:
        started = time.perf_counter()
        self._steps_since_trim += 1
        for p in plan:
            if p is not None and p.started_at is None:
                p.started_at = started
        try:
            handle = self._forward(*self._step_args(step.items, plan, self.dimensions))
        except Exception as exc:
            if self._raise_if_fatal(exc, step) == "oom":
                self._split_after_oom(step, plan, started)
            else:
                self._fail_step(step, plan, exc, started)
            return
        self._inflight.append(_InFlight(step, plan, handle, started))

    def _deliver(self, f: _InFlight) -> None:
        try:
            out = self.runner.collect(f.handle)
        except Exception as exc:
            self._raise_if_fatal(exc, f.step)
            self._fail_step(f.step, f.plan, exc, f.started)
            return
        rows = {i: (out.vectors[i], out.encoded_row(i), out.pieces_of(i), out.vectors_of(i))
                for i in range(len(f.step.items))}
        self._finish(f.step, f.plan, rows, {}, f.started, self._weighed(f.step.items, f.plan, out))

    def _split_after_oom(self, step: Step, plan: list[_Pending | None], started: float) -> None:
        """The step did not fit in device memory: run it in halves (and their halves), so that only an input
        that does not fit on its own fails, with a 400; requests that merely shared the step are answered."""
        log.warning("out of device memory in a step of %d inputs (%d tokens): retrying it in parts",
                    len(step.items), step.num_tokens)
        self.observer.step_split(len(step.items))
        while self._inflight:  # their memory comes back first
            self._deliver(self._inflight.popleft())
        release_cached_memory(self.device)

        weighed: dict[int, tuple] = {}

        def run(indices: list[int]) -> list[tuple[torch.Tensor, bytes]]:
            items = [step.items[i] for i in indices]
            out = self.runner.collect(self._forward(*self._step_args(items, [plan[i] for i in indices],
                                                                     self.dimensions)))
            found = self._weighed(items, [plan[i] for i in indices], out)
            weighed.update({indices[j]: x for j, x in found.items()})
            return [(out.vectors[j], out.encoded_row(j), out.pieces_of(j), out.vectors_of(j))
                    for j in range(len(indices))]

        rows, failed = run_in_parts(len(step.items), run, group=lambda i: step.items[i].entry.request_id,
                                    kind=lambda exc: self._raise_if_fatal(exc, step),
                                    after_oom=lambda: release_cached_memory(self.device))
        failures: dict[int, EmbedServeError] = {}
        for f in failed:
            if f.alone_oom:
                w = step.items[f.indices[0]]
                log.warning("input %d of request %d (%d tokens) does not fit in device memory alone: refused",
                            w.entry.index, w.entry.request_id, w.entry.num_tokens)
                failures[w.entry.request_id] = InputTooLarge(w.entry.index, w.entry.num_tokens, self.max_batch_tokens)
                continue
            log.error("forward pass of %d inputs (part of a split step) failed", len(f.indices), exc_info=f.error)
            self.observer.step_failed(len(f.indices))
            for i in f.indices:
                failures[step.items[i].entry.request_id] = _engine_error(f.error)
        self._finish(step, plan, rows, failures, started, weighed)

    def _weighed(self, items: Sequence[Work], plan: Sequence[_Pending | None], out
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """bge-m3: the lexical weights by token id of each input whose request asked for them (found before the
        lock submitters wait on)."""
        if out.token_weights is None:
            return {}
        whole = [i for i, (w, p) in enumerate(zip(items, plan)) if not w.chunked and p is not None
                 and p.sparse is not None]
        if not whole:
            return {}
        at = list(itertools.accumulate((w.length for w in items), initial=0))
        weights = torch.cat([out.token_weights[at[i] : at[i + 1]] for i in whole])
        return dict(zip(whole, lexical_rows([items[i].entry.payload for i in whole], weights)))

    def _fail_step(self, step: Step, plan: list[_Pending | None], exc: BaseException, started: float) -> None:
        log.error("forward pass of %d inputs (%d tokens) failed", len(step.items), step.num_tokens, exc_info=exc)
        self.observer.step_failed(len(step.items))
        err = _engine_error(exc)
        self._finish(step, plan, {}, {e.request_id: err for e in step.entries}, started)

    def _finish(
        self, step: Step, plan: list[_Pending | None], rows: dict[int, tuple], failures: dict[int, EmbedServeError],
        started: float, weighed: dict[int, tuple] | None = None,
    ) -> None:
        """Retire a step: its rows into their requests, finished requests answered, failed ones refused. ``rows``:
        per item, (its row, its encoded bytes, its span sums, its per-token vectors); ``weighed``: per item, bge-m3's
        lexical weights."""
        finished_at = time.perf_counter()
        if rows:
            self.observer.step(len(rows), sum(step.items[i].length for i in rows), finished_at - started)
            span = StepSpan(started, finished_at, step.num_tokens, len(step.items))
            for p in {id(p): p for i, p in enumerate(plan) if p is not None and i in rows}.values():
                p.steps.append(span)
        if self.sparse:  # a SPLADE row as its nonzeros (ids, weights), found before the lock submitters wait on
            rows = {i: (_nonzeros(row), data, pieces, vecs) for i, (row, data, pieces, vecs) in rows.items()}
        with self._cond:
            for i, (w, p) in enumerate(zip(step.items, plan)):
                if p is None or i not in rows or w.entry.request_id in failures:
                    continue
                row, data, pieces, vecs = rows[i]
                if p.spans is not None:  # late chunking: every step's part of each span, into its chunk
                    if p.sums is None:
                        p.sums = torch.zeros(len(p.token_counts), pieces.shape[1])
                    targets = [c for _, _, c in p.spans[w.entry.index]]
                    p.sums.index_add_(0, torch.tensor(targets, dtype=torch.long), pieces)
                elif self.sparse:
                    p.sparse[w.entry.index] = row
                elif w.final:
                    if p.sparse is not None:
                        p.sparse[w.entry.index] = weighed[i]
                    if p.multi is not None:
                        p.multi[w.entry.index] = vecs if vecs is not None else torch.empty(0, 0)
                    p.rows[w.entry.index] = row
                    if p.encoded is not None:
                        p.encoded[w.entry.index] = data
            finished = self.scheduler.complete(step)
            doomed = []
            for rid, err in failures.items():
                self.scheduler.abort(rid)  # its inputs still queued, and long ones' key caches, go
                p = self._pending.pop(rid, None)
                if p is not None:
                    doomed.append((p, err))
            self.runner.free(self.scheduler.take_released())  # long inputs cancelled or failed meanwhile
            done = [self._pending.pop(rid) for rid in finished if rid in self._pending]
        for p, err in doomed:
            _answer(p, _set_exception, err)
        for p in done:
            if p.spans is not None and not self._finish_document(p):
                continue
            timings = Timings(p.tokenize_s, p.started_at - p.queued_at, finished_at - p.started_at, p.queued_at,
                              tuple(p.steps))
            _answer(p, _set_result, EmbedResult(
                p.rows[:, : p.dims], p.token_counts,
                {ENCODING_NAMES[p.encoding]: p.encoded} if p.encoded is not None else {}, timings, p.sparse,
                p.multi))

    def _finish_document(self, p: _Pending) -> bool:
        """A late-chunked document's chunk vectors: each chunk's mean state through the Dense layers, the cut,
        normalisation and encoding. False (and the request answered with the error) if that fails."""
        n = len(p.token_counts)
        means = p.sums / torch.tensor(p.token_counts, dtype=torch.float32).unsqueeze(1)
        try:
            out = self.runner.finish(means, [p.dims] * n, [p.normalize] * n, [p.encoding] * n, [p.ranges] * n)
        except Exception as exc:
            self._raise_if_fatal(exc, Step([]))
            log.error("finishing a late-chunked document of %d chunks failed", n, exc_info=exc)
            _answer(p, _set_exception, _engine_error(exc))
            return False
        p.rows = out.vectors
        if p.encoded is not None:
            p.encoded = [out.encoded_row(i) for i in range(n)]
        return True

    def _die(self, exc: BaseException, failing: list[Step]) -> None:
        """The engine cannot go on: answer every request it holds (500 for the steps that failed, 503 for the
        rest, which another replica can serve), refuse new ones, and tell the server."""
        with self._cond:
            self._dead = exc
            pending, self._pending = self._pending, {}
        culprits = {e.request_id for s in failing for e in s.entries}
        log.critical(
            "the engine stopped: %s: %s. %d requests held were refused (%d in the failing step(s) with 500, the "
            "rest with 503); new requests get 503.",
            type(exc).__name__, exc, len(pending), len(culprits & set(pending)),
        )
        for rid, p in pending.items():
            err = (_engine_error(exc) if rid in culprits else
                   EngineFailed("The inference engine stopped; retry on another replica."))
            _answer(p, _set_exception, err)
        if self._on_fatal is not None:
            self._on_fatal(exc)


def _nonzeros(row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = row.nonzero().squeeze(1)
    return ids, row.index_select(0, ids)


def _engine_error(exc: BaseException) -> EngineError:
    return EngineError(f"The forward pass failed ({type(exc).__name__}); the request can be retried.")

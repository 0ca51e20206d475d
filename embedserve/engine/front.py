"""The async front the HTTP layer awaits, and the engine thread behind it.

``await engine.embed(inputs, options)`` tokenizes in a thread pool, queues every input in the scheduler,
and waits on a future. One engine thread owns the model: it takes a step from the scheduler, launches it,
writes each row into its request's result and resolves finished requests on their event loop with
``loop.call_soon_threadsafe``. The thread blocks on a condition variable while the queue is empty: no
timers, no polling, and whatever arrives during a forward pass is packed into the next one.

On CUDA the thread keeps two steps in flight: while the device runs one, the next is packed, staged and
queued behind it, and the first one's results are handed back when its event fires. On the CPU a launch
computes the step, so one step at a time.

Faults (see :mod:`embedserve.engine.faults`): an ordinary failure fails exactly its step's requests (500);
out-of-memory splits the step and retries the parts, refusing only an input that does not fit alone (400);
a fatal device error stops the engine: the failing step's requests get 500, every other request held gets
503, new ones 503, and ``on_fatal`` tells the server, which turns unhealthy and exits for a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from embedserve.config import EngineConfig
from embedserve.engine.device import bind_thread, release_cached_memory, release_host_memory
from embedserve.engine.faults import classify, injected, run_in_parts
from embedserve.engine.interface import EmbedOptions, EmbedResult, StepObserver, Timings
from embedserve.engine.loading import load
from embedserve.engine.runner import Chunk, StepHandle
from embedserve.engine.scheduler import Entry, Step, Work
from embedserve.engine.token_ids import cl100k
from embedserve.engine.turns import DeviceTurns
from embedserve.errors import (
    ConfigError,
    ContextLengthExceeded,
    EmbedServeError,
    EngineError,
    EngineFailed,
    InputTooLarge,
    InvalidRequest,
    ShuttingDown,
    WrongModelKind,
)
from embedserve.models.classifier import ChatTemplate, apply_activation

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
    base64: list[bytes] | None
    tokenize_s: float
    queued_at: float
    started_at: float | None = None
    type_starts: list[int] | None = None  # pairs: where each input's second text starts


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


class Engine:
    """Owns the model, the tokenizer, the scheduler and the engine thread."""

    def __init__(
        self,
        config: EngineConfig,
        observer: StepObserver | None = None,
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
        pipeline_depth: int | None = None,
        turns: DeviceTurns | None = None,
        name: str | None = None,
    ) -> None:
        """``on_fatal``: called from the engine thread once the engine has stopped for good (a device error
        that poisons the CUDA context, or a bug that killed the thread). ``pipeline_depth``: steps in flight at
        once; default 2 on CUDA (the next step is staged while one runs), 1 on the CPU. ``turns``: shared by the
        engines of several models on one device, so that their steps go to it one at a time, in turn; ``name``:
        this model's name there."""
        self.config = config
        self.observer = observer or StepObserver()
        self._turns = turns
        self.name = name or config.model.path
        self._on_fatal = on_fatal
        loaded = load(config, self.name, pipeline_depth=pipeline_depth)
        self.loaded = loaded
        # The parts the async front and the engine thread use, by name.
        self.device, self.dtype, self.source, self.model = loaded.device, loaded.dtype, loaded.source, loaded.model
        self.tokenizer, self.scheduler, self.runner, self.info = (loaded.tokenizer, loaded.scheduler, loaded.runner,
                                                                  loaded.info)
        self.linear_plan, self.linear_backend = loaded.linear_plan, loaded.linear_backend
        self.attention_backend, self.pool_backend = loaded.attention_backend, loaded.pool_backend
        self.max_length, self.id_limit = loaded.max_length, loaded.id_limit
        self._text_ids_may_overflow, self._token_types = loaded.text_ids_may_overflow, loaded.token_types
        self._fault_ids = loaded.fault_ids
        self.max_batch_tokens = loaded.budgets.max_batch_tokens
        self.chunk_tokens, self.max_kv_tokens = loaded.budgets.chunk_tokens, loaded.budgets.max_kv_tokens
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
        self._tok_pool = ThreadPoolExecutor(config.tokenizer_workers, thread_name_prefix="embedserve-tokenize")

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    @property
    def kind(self) -> str:
        return self.model.kind

    def queue_stats(self) -> tuple[int, int, int, int]:
        """(waiting inputs, waiting tokens, running inputs, inputs dropped by cancellation so far)."""
        st = self.scheduler.stats
        with self._cond:
            return st.waiting_inputs, st.waiting_tokens, st.running_inputs, st.dropped_inputs

    # -- lifecycle ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the shapes serving will run before the first request: a full ``max_batch_tokens`` pass, and for
        chunking models a long input in chunks over its key cache (on CUDA the longest input the model takes,
        beside full steps, with the rest of ``--max-kv-tokens`` held). A budget the device cannot hold fails
        here, at boot, naming the flag to lower."""
        bind_thread(self.device)
        ids = self.tokenizer.encode(["warm up " * self.max_length], truncate=True)[0]
        ids = ids[: min(len(ids), self.max_batch_tokens)]
        count = max(1, min(self.max_batch_tokens // len(ids), self.scheduler.max_batch_requests))
        started = time.perf_counter()
        try:
            self.runner.run([ids] * count, [self.dimensions] * count, [False] * count)
        except Exception as e:
            if classify(e) == "oom":
                raise ConfigError(
                    f"warm-up pass of {count * len(ids)} tokens ran out of {self.device.type.upper()} memory; lower "
                    f"--max-batch-tokens (now {self.max_batch_tokens}): {e}"
                ) from e
            # Short of memory, oneDNN fails in its own words ("could not create a primitive"): the largest step
            # is what the budget decides, so the flag is named whatever the cause.
            raise ConfigError(
                f"warm-up pass of {count * len(ids)} tokens failed ({type(e).__name__}: {e}); if memory is short "
                f"here, lower --max-batch-tokens (now {self.max_batch_tokens})"
            ) from e
        log.info("warm-up: %d inputs, %d tokens in %.2fs", count, count * len(ids), time.perf_counter() - started)
        if self.linear_plan.probe:
            log.info("linear layers: %s", self.linear_plan.describe())
        if self.chunk_tokens is not None and self.max_length > self.chunk_tokens:
            self._warm_up_chunks()

    def _warm_up_chunks(self) -> None:
        chunk, cuda = self.chunk_tokens, self.device.type == "cuda"
        # On the CPU memory is not what can fail: two chunks exercise the path. On CUDA, the worst case.
        length = self.max_length if cuda else min(self.max_length, chunk + 1)
        ids = self.tokenizer.encode(["warm up " * length], truncate=True)[0]
        ids = (ids * (length // len(ids) + 1))[:length]
        filler = ids[:chunk]
        key = ("warm-up",)
        started = time.perf_counter()
        reserve = None
        try:
            if cuda and self.max_kv_tokens > length:
                # The key caches of other long inputs in progress, which the budget allows at the same time.
                reserve = self.model.encoder.new_cache(self.max_kv_tokens - length, self.device)
            for start in range(0, length, chunk):
                n = min(chunk, length - start)
                fill = (self.max_batch_tokens - n) // chunk if cuda else 0
                inputs = [ids[start : start + n]] + [filler] * fill
                chunks = [Chunk(key, start, length, start + n == length)] + [None] * fill
                B = len(inputs)
                self.runner.run(inputs, [self.dimensions] * B, [False] * B, [False] * B, chunks)
        except Exception as e:
            if classify(e) != "oom":
                raise
            raise ConfigError(
                f"warm-up of a {length}-token input in chunks of {chunk} beside full steps of "
                f"{self.max_batch_tokens} tokens, with {self.max_kv_tokens} key-cache tokens held, ran out of "
                f"{self.device.type.upper()} memory; lower --max-kv-tokens (now {self.max_kv_tokens}) or "
                f"--max-batch-tokens (now {self.max_batch_tokens}): {e}"
            ) from e
        finally:
            self.runner.free([key])
            del reserve
        log.info("warm-up: a %d-token input in chunks of %d over its key cache in %.2fs", length, chunk,
                 time.perf_counter() - started)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_forever, name="embedserve-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting work, finish every queued input, then stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # -- the async front ------------------------------------------------------------------------------
    async def embed(self, inputs: Sequence[str | Sequence[int]], options: EmbedOptions = EmbedOptions()) -> EmbedResult:
        """Embed a request's inputs (texts, or token ids in the model's vocabulary)."""
        if self.kind != "embedding":
            raise WrongModelKind("embeddings", self.kind, "embedding")
        if not inputs:
            raise InvalidRequest("input must not be empty", param="input")
        dims = options.dimensions or self.dimensions
        if not 1 <= dims <= self.dimensions:
            raise InvalidRequest(
                f"dimensions must be between 1 and {self.dimensions} for this model, got {dims}", param="dimensions"
            )
        normalize = options.normalize
        if normalize is None:
            normalize = self.model.spec.normalize or options.dimensions is not None
        truncate = self.config.truncate if options.truncate is None else options.truncate

        prompt = self.prompt(options.prompt_name)
        return await self._submit(self._prepare, (inputs, truncate, prompt), dims, normalize, options.base64)

    async def score(self, pairs: Sequence[tuple[str, str | None]], *, truncate: bool | None = None,
                    max_doc_tokens: int | None = None, route: str = "rerank") -> EmbedResult:
        """Score (query, document) pairs with a cross-encoder or classifier (single texts: None as the second
        element). ``vectors`` holds the raw logits ``[n, labels]``; :func:`apply_activation` gives the scores.
        ``max_doc_tokens``: each document cut to that many tokens first."""
        if self.model.head is None:
            raise WrongModelKind(route, self.kind, "rerank")
        if not pairs:
            raise InvalidRequest("there is nothing to score", param="documents")
        truncate = self.config.truncate if truncate is None else truncate
        return await self._submit(self._prepare_pairs, (pairs, truncate, max_doc_tokens), self.dimensions, False,
                                  False)

    def scores(self, logits: torch.Tensor, *, raw: bool = False, activation: str | None = None) -> torch.Tensor:
        """:meth:`score`'s logits as scores: the model's declared activation, the one named, or raw."""
        if raw:
            return logits
        return apply_activation(logits, activation or self.model.classifier.activation)

    def _prepare_pairs(self, pairs: Sequence[tuple[str, str | None]], truncate: bool, max_doc_tokens: int | None
                       ) -> tuple[list[list[int]], list[int]]:
        if max_doc_tokens is not None and all(d is not None for _, d in pairs):
            docs = self.tokenizer.cut([d for _, d in pairs], max_doc_tokens)
            pairs = [(q, d) for (q, _), d in zip(pairs, docs)]
        singles = [i for i, (_, d) in enumerate(pairs) if d is None]
        if singles and len(singles) != len(pairs):
            raise InvalidRequest("inputs must be all single texts or all pairs, not a mix", param="inputs")
        template = self.model.classifier.template
        if template is not None:
            if singles:
                raise InvalidRequest("this reranker scores (query, document) pairs, not single texts", param="inputs")
            if isinstance(template, ChatTemplate):
                ids = self.tokenizer.encode_chat(pairs, truncate=truncate)
            else:
                ids = self.tokenizer.encode_templated(
                    [template.middle.format(query=q, document=d) for q, d in pairs], truncate=truncate)
            starts = [len(x) for x in ids]
        elif singles:
            ids = self.tokenizer.encode([q for q, _ in pairs], truncate=truncate)
            starts = [len(x) for x in ids]
        else:
            ids, starts = self.tokenizer.encode_pairs(pairs, truncate=truncate)
        if self._text_ids_may_overflow:
            for i, x in enumerate(ids):
                if any(t >= self.id_limit for t in x):
                    raise InvalidRequest(f"input {i} tokenizes to an id past the served model's embedding table",
                                         param="documents")
        return ids, starts

    async def _submit(self, prepare, args: tuple, dims: int, normalize: bool, base64: bool) -> EmbedResult:
        """Tokenize on the pool (``prepare(*args)`` -> ids, or (ids, type starts)), queue every input, and
        wait for the engine thread to finish them all."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            prepared = await loop.run_in_executor(self._tok_pool, prepare, *args)
        except asyncio.CancelledError:
            log.info("request cancelled while tokenizing %d inputs: nothing was queued", len(args[0]))
            raise
        ids, type_starts = prepared if isinstance(prepared, tuple) else (prepared, None)
        tokenized = time.perf_counter()
        counts = [len(x) for x in ids]
        limit = self.config.max_tokens_per_request
        if limit is not None and sum(counts) > limit:
            raise InvalidRequest(
                f"The request holds {sum(counts)} tokens; this server accepts at most {limit} per request "
                "(--max-tokens-per-request). Split it into smaller requests.",
                param="input", code="request_too_large",
            )
        fut = loop.create_future()
        rid = next(self._ids)
        entries = [Entry(rid, i, len(x), x) for i, x in enumerate(ids)]
        with self._cond:
            if self._stopping:
                raise ShuttingDown("The server is shutting down; retry on another replica.")
            if self._dead is not None:
                raise EngineFailed("The inference engine stopped after a device error; retry on another replica.")
            self.scheduler.add(rid, entries)  # may raise Overloaded
            self._pending[rid] = _Pending(
                loop, fut, torch.empty(len(ids), self.dimensions), dims, normalize, counts,
                [b""] * len(ids) if base64 else None, tokenized - started, tokenized,
                type_starts=type_starts if self._token_types else None,
            )
            self._cond.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            with self._cond:
                dropped = self.scheduler.abort(rid)
                self._pending.pop(rid, None)
                self._cond.notify()  # the engine thread frees the key caches of its long inputs
            log.info("request %d cancelled: %d of its %d inputs dropped from the queue", rid, dropped, len(ids))
            raise

    async def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[tuple]]:
        """Each text's tokens as (id, text, special, start, stop), on the tokenisation pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, lambda: self.tokenizer.tokens(texts, add_special_tokens=add_special_tokens))

    async def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """Token ids (each below ``info.id_limit``) back to text, on the tokenisation pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tok_pool, lambda: self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def prompt(self, name: str | None) -> str:
        """The text of one of the model's prompts (None: its default prompt, if any); unknown is a 400."""
        spec = self.model.spec
        name = name if name is not None else spec.default_prompt_name
        if name is None:
            return ""
        if name not in spec.prompts:
            known = ", ".join(sorted(spec.prompts)) or "none"
            raise InvalidRequest(f"unknown prompt_name {name!r}; this model's prompts: {known}", param="prompt_name")
        return spec.prompts[name]

    def _prepare(self, inputs: Sequence[str | Sequence[int]], truncate: bool, prompt: str = "") -> list[list[int]]:
        texts = [x for x in inputs if isinstance(x, str)]
        if texts and len(texts) != len(inputs):
            raise InvalidRequest("input must be all strings or all token-id lists, not a mix", param="input")
        if not texts:
            # Checked here, on the tokenisation pool: a request may carry millions of ids.
            for i, x in enumerate(inputs):
                if not x:
                    raise InvalidRequest(f"input[{i}] is an empty token-id array", param="input")
                if not all(type(t) is int for t in x):  # JSON true/false are bools, not token ids
                    raise InvalidRequest(f"input[{i}] must be an array of integer token ids", param="input")
        if not texts and self.config.token_ids == "cl100k":
            decoder = cl100k()
            texts = [decoder.decode(list(x), index=i) for i, x in enumerate(inputs)]
        if texts:
            if prompt:
                texts = [prompt + t for t in texts]
            ids = self.tokenizer.encode(texts, truncate=truncate)
            if self._text_ids_may_overflow:
                rows = self.id_limit
                for i, x in enumerate(ids):
                    bad = next((t for t in x if t >= rows), None)
                    if bad is not None:
                        raise InvalidRequest(
                            f"input[{i}] tokenizes to id {bad}, past the {rows} rows of the served model's "
                            "embedding table (its tokenizer knows more tokens than its weights)", param="input",
                        )
            return ids
        if prompt:
            raise InvalidRequest(
                "a prompt cannot be applied to token ids in the model's vocabulary; send text", param="prompt_name"
            )
        out = []
        vocab = self.id_limit  # the tokenizer's tokens that the embedding table has rows for
        for i, x in enumerate(inputs):
            x = list(x)
            bad = next((t for t in x if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{i}] has token id {bad}, outside the served model's vocabulary (0..{vocab - 1}) "
                    "that this server reads token ids in. If you send OpenAI (tiktoken cl100k_base) ids, start "
                    "the server with --token-ids cl100k (EMBEDSERVE_TOKEN_IDS=cl100k).",
                    param="input",
                )
            if len(x) > self.max_length:
                if not truncate:
                    raise ContextLengthExceeded(self.max_length, len(x), index=i)
                x = x[: self.max_length]
            out.append(x)
        return out

    # -- the engine thread ----------------------------------------------------------------------------
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
        if self._token_types:
            type_starts = [p.type_starts[w.entry.index] if p and p.type_starts else len(x)
                           for w, p, x in zip(items, plan, inputs)]
        return (
            inputs,
            [p.dims if p else dims for p in plan],
            [p.normalize if p else False for p in plan],
            [bool(p and p.base64 is not None) for p in plan],
            chunks if any(chunks) else None,
            type_starts,
        )

    def _forward(self, inputs, dims, normalize, want_b64, chunks, type_starts=None) -> StepHandle:
        if self._fault_ids is not None and self._fault_ids in inputs:
            raise injected(self.config.fault_kind)
        # With several models on the device, the others' steps wait for this one, in turn.
        with self._turns.turn(self.name) if self._turns is not None else contextlib.nullcontext():
            return self.runner.launch(inputs, dims, normalize, want_b64, chunks, type_starts)

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
        rows = {i: (out.vectors[i], out.base64_row(i)) for i in range(len(f.step.items))}
        self._finish(f.step, f.plan, rows, {}, f.started)

    def _split_after_oom(self, step: Step, plan: list[_Pending | None], started: float) -> None:
        """The step did not fit in device memory: run it in halves (and their halves), so that only an input
        that does not fit on its own fails, with a 400; requests that merely shared the step are answered."""
        log.warning("out of device memory in a step of %d inputs (%d tokens): retrying it in parts",
                    len(step.items), step.num_tokens)
        self.observer.step_split(len(step.items))
        while self._inflight:  # their memory comes back first
            self._deliver(self._inflight.popleft())
        release_cached_memory(self.device)

        def run(indices: list[int]) -> list[tuple[torch.Tensor, bytes]]:
            items = [step.items[i] for i in indices]
            out = self.runner.collect(self._forward(*self._step_args(items, [plan[i] for i in indices],
                                                                     self.dimensions)))
            return [(out.vectors[j], out.base64_row(j)) for j in range(len(indices))]

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
        self._finish(step, plan, rows, failures, started)

    def _fail_step(self, step: Step, plan: list[_Pending | None], exc: BaseException, started: float) -> None:
        log.error("forward pass of %d inputs (%d tokens) failed", len(step.items), step.num_tokens, exc_info=exc)
        self.observer.step_failed(len(step.items))
        err = _engine_error(exc)
        self._finish(step, plan, {}, {e.request_id: err for e in step.entries}, started)

    def _finish(
        self, step: Step, plan: list[_Pending | None], rows: dict[int, tuple[torch.Tensor, bytes]],
        failures: dict[int, EmbedServeError], started: float,
    ) -> None:
        """Retire a step: its rows into their requests, finished requests answered, failed ones refused."""
        finished_at = time.perf_counter()
        if rows:
            self.observer.step(len(rows), sum(step.items[i].length for i in rows), finished_at - started)
        with self._cond:
            for i, (w, p) in enumerate(zip(step.items, plan)):
                if p is not None and w.final and i in rows and w.entry.request_id not in failures:
                    row, text = rows[i]
                    p.rows[w.entry.index] = row
                    if p.base64 is not None:
                        p.base64[w.entry.index] = text
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
            timings = Timings(p.tokenize_s, p.started_at - p.queued_at, finished_at - p.started_at)
            _answer(p, _set_result, EmbedResult(p.rows[:, : p.dims], p.token_counts, p.base64, timings))

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


def _engine_error(exc: BaseException) -> EngineError:
    return EngineError(f"The forward pass failed ({type(exc).__name__}); the request can be retried.")


__all__ = ["Engine"]

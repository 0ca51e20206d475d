"""The async front the HTTP layer awaits, and the engine thread behind it.

``await engine.embed(inputs, options)`` tokenizes in a thread pool, queues every input in the scheduler,
and waits on a future. One engine thread owns the model: it takes a step from the scheduler, runs it,
writes each row into its request's result and resolves finished requests on their event loop with
``loop.call_soon_threadsafe``. The thread blocks on a condition variable while the queue is empty: no
timers, no polling, and whatever arrives during a forward pass is packed into the next one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from embedserve.config import EngineConfig
from embedserve.engine.runner import Chunk, Runner
from embedserve.engine.scheduler import Entry, Scheduler, Step
from embedserve.engine.token_ids import cl100k
from embedserve.engine.tokenizer import Tokenizer
from embedserve.errors import (
    ConfigError,
    ContextLengthExceeded,
    EngineError,
    InvalidRequest,
    ShuttingDown,
)
from embedserve.kernels.attention import select_backend
from embedserve.kernels.linear import select_linear_backend
from embedserve.kernels.pool_encode import select_pool_backend
from embedserve.models.sentence import DTYPES, LoadedModel, load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    dimensions: int | None = None
    """Keep the first k values, then L2-renormalise."""
    normalize: bool | None = None
    """None: as the model's modules say."""
    truncate: bool | None = None
    """None: the server's setting."""
    prompt_name: str | None = None
    """One of the model's sentence-transformers prompts; None: its default prompt, if any."""
    base64: bool = False
    """Also produce each vector's little-endian float32 base64 (on the device, with the pooling)."""


@dataclass(frozen=True)
class Timings:
    tokenize_s: float = 0.0
    queue_s: float = 0.0  # queued until its first input entered a forward pass
    inference_s: float = 0.0  # from then until its last input came out


@dataclass(frozen=True)
class EmbedResult:
    vectors: torch.Tensor  # [n, k] float32, CPU
    token_counts: list[int]
    base64: list[bytes] | None = None  # per input, when asked for
    timings: Timings = Timings()

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


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


class StepObserver:
    """What the engine reports about its work; the HTTP layer's metrics implement it. Called from the
    engine thread, so implementations must be thread-safe (prometheus-client's are)."""

    def step(self, inputs: int, tokens: int, seconds: float) -> None: ...

    def step_failed(self, inputs: int) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _set_result(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


class Engine:
    """Owns the model, the tokenizer, the scheduler and the engine thread."""

    def __init__(self, config: EngineConfig, observer: StepObserver | None = None) -> None:
        self.config = config
        self.observer = observer or StepObserver()
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        started = time.perf_counter()
        self.model: LoadedModel = load_model(config.model.path, dtype=self.dtype, device=self.device)
        self.attention_backend = select_backend(self.device, config.model.attention, self.dtype)
        self.model.encoder.attention_backend = self.attention_backend
        self.linear_backend = select_linear_backend(self.device, self.dtype)
        self.model.encoder.linear_backend = self.linear_backend
        max_length = self.model.max_length
        if config.max_input_tokens is not None:
            max_length = min(max_length, config.max_input_tokens)
        self.tokenizer = Tokenizer(
            self.model.directory, max_length=max_length, do_lower_case=self.model.spec.do_lower_case,
            cap_to_tokenizer=self.model.spec.max_seq_length is None,
        )
        self.max_length = self.tokenizer.max_length
        if config.token_ids == "cl100k":
            cl100k()  # build the id table now, on the loading thread, not inside the first request
        # Test hook: a step holding an input equal to this text's tokens raises, as a broken forward would.
        self._fault_ids = (
            self.tokenizer.encode([config.fault_marker], truncate=True)[0] if config.fault_marker else None
        )
        sc = config.scheduler
        self.max_batch_tokens = sc.max_batch_tokens or (16384 if self.device.type == "cuda" else 4096)
        chunking = bool(getattr(self.model.encoder, "supports_chunking", False)) and sc.chunk_tokens != 0
        self.chunk_tokens: int | None = None
        max_kv = None
        if chunking:
            # Causal models run long inputs as chunks over a key cache: any length up to the model's.
            self.chunk_tokens = sc.chunk_tokens or max(1, self.max_batch_tokens // 8)
            max_kv = sc.max_kv_tokens or max(4 * self.max_batch_tokens, self.max_length)
            if max_kv < self.max_length:
                raise ConfigError(
                    f"max_kv_tokens={max_kv} is below the model's maximum input length {self.max_length}: "
                    f"the longest input could never hold its key cache. Raise --max-kv-tokens to at least "
                    f"{self.max_length}."
                )
        elif self.max_batch_tokens < self.max_length:
            raise ConfigError(
                f"max_batch_tokens={self.max_batch_tokens} is below the model's maximum input length "
                f"{self.max_length}; this model attends both ways, so an input runs in one pass and one that "
                f"long could never be scheduled. Raise --max-batch-tokens to at least {self.max_length}, or "
                f"lower --max-input-tokens."
            )
        self.scheduler = Scheduler(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_requests=sc.max_batch_requests,
            max_queue=sc.max_queue,
            chunk_tokens=self.chunk_tokens,
            max_kv_tokens=max_kv,
        )
        self.pool_backend = select_pool_backend(self.device, config.model.pool_kernel)
        self.runner = Runner(self.model, self.pool_backend)
        self._cond = threading.Condition()
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._tok_pool = ThreadPoolExecutor(config.tokenizer_workers, thread_name_prefix="embedserve-tokenize")
        log.info(
            "loaded %s in %.1fs: %s on %s, dtype %s, attention %s, linear %s, pool+encode %s, pooling %s%s%s, dimensions %d, "
            "max input %d tokens, max batch %d tokens / %d inputs",
            self.model.directory, time.perf_counter() - started, type(self.model.encoder).__name__,
            self.device, str(self.dtype).removeprefix("torch."), self.attention_backend, self.linear_backend,
            self.pool_backend, self.model.spec.pooling,
            f" + {len(self.model.dense)} dense" if len(self.model.dense) else "",
            " + normalize" if self.model.spec.normalize else "", self.model.dimensions, self.max_length,
            self.max_batch_tokens, sc.max_batch_requests,
        )

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    def queue_stats(self) -> tuple[int, int, int, int]:
        """(waiting inputs, waiting tokens, running inputs, inputs dropped by cancellation so far)."""
        st = self.scheduler.stats
        with self._cond:
            return st.waiting_inputs, st.waiting_tokens, st.running_inputs, st.dropped_inputs

    # -- lifecycle ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One full ``max_batch_tokens`` pass before serving: the first request pays no start-up cost, and a
        budget the device cannot hold fails here, at boot, naming the flag to lower."""
        ids = self.tokenizer.encode(["warm up " * self.max_length], truncate=True)[0]
        ids = ids[: min(len(ids), self.max_batch_tokens)]
        count = max(1, min(self.max_batch_tokens // len(ids), self.scheduler.max_batch_requests))
        started = time.perf_counter()
        try:
            self.runner.run([ids] * count, [self.dimensions] * count, [False] * count)
        except torch.OutOfMemoryError as e:
            raise ConfigError(
                f"warm-up pass of {count * len(ids)} tokens ran out of device memory; lower --max-batch-tokens "
                f"(now {self.max_batch_tokens}): {e}"
            ) from e
        log.info("warm-up: %d inputs, %d tokens in %.2fs", count, count * len(ids), time.perf_counter() - started)

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

        prompt = self._prompt(options.prompt_name)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            ids = await loop.run_in_executor(self._tok_pool, self._prepare, inputs, truncate, prompt)
        except asyncio.CancelledError:
            log.info("request cancelled while tokenizing %d inputs: nothing was queued", len(inputs))
            raise
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
                raise EngineError("The inference engine has stopped; the server must be restarted.")
            self.scheduler.add(rid, entries)  # may raise Overloaded
            self._pending[rid] = _Pending(
                loop, fut, torch.empty(len(ids), self.dimensions), dims, normalize, counts,
                [b""] * len(ids) if options.base64 else None, tokenized - started, tokenized,
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

    def _prompt(self, name: str | None) -> str:
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
            return self.tokenizer.encode(texts, truncate=truncate)
        if prompt:
            raise InvalidRequest(
                "a prompt cannot be applied to token ids in the model's vocabulary; send text", param="prompt_name"
            )
        out = []
        vocab = self.tokenizer.vocab_size
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
            while True:
                with self._cond:
                    while not self.scheduler.has_waiting() and not self._stopping:
                        self.runner.free(self.scheduler.take_released())  # cancelled long inputs
                        self._cond.wait()
                    self.runner.free(self.scheduler.take_released())
                    step = self.scheduler.schedule()
                    if step is None:  # stopping and drained
                        return
                    plan = [self._pending.get(e.request_id) for e in step.entries]
                self._run_step(step, plan)
        except BaseException as exc:  # the thread must never die silently with callers waiting
            log.exception("engine thread died; failing every pending request")
            with self._cond:
                self._dead = exc
                pending, self._pending = self._pending, {}
            for p in pending.values():
                p.loop.call_soon_threadsafe(
                    _set_exception, p.future, EngineError("The inference engine stopped unexpectedly.")
                )

    def _run_step(self, step: Step, plan: list[_Pending | None]) -> None:
        inputs = [w.entry.payload[w.start : w.start + w.length] if w.chunked else w.entry.payload for w in step.items]
        chunks = [
            Chunk((w.entry.request_id, w.entry.index), w.start, w.entry.num_tokens, w.final) if w.chunked else None
            for w in step.items
        ]
        started = time.perf_counter()
        for p in plan:
            if p is not None and p.started_at is None:
                p.started_at = started
        dims = [p.dims if p else self.dimensions for p in plan]
        normalize = [p.normalize if p else False for p in plan]
        want_b64 = [bool(p and p.base64 is not None) for p in plan]
        try:
            if self._fault_ids is not None and self._fault_ids in inputs:
                raise RuntimeError("fault injected by --fault-marker")
            out = self.runner.run(inputs, dims, normalize, want_b64, chunks if any(chunks) else None)
        except Exception as exc:
            log.exception("forward pass of %d inputs (%d tokens) failed", len(inputs), step.num_tokens)
            self.observer.step_failed(len(inputs))
            failed = {e.request_id for e in step.entries}
            with self._cond:
                self.scheduler.complete(step)
                doomed = []
                for rid in failed:
                    self.scheduler.abort(rid)
                    p = self._pending.pop(rid, None)
                    if p is not None:
                        doomed.append(p)
                self.runner.free(self.scheduler.take_released())
            err = EngineError(f"The forward pass failed ({type(exc).__name__}); the request can be retried.")
            for p in doomed:
                p.loop.call_soon_threadsafe(_set_exception, p.future, err)
            return
        finished_at = time.perf_counter()
        self.observer.step(len(inputs), step.num_tokens, finished_at - started)
        with self._cond:
            for i, (row, w, p) in enumerate(zip(out.vectors, step.items, plan)):
                if p is not None and w.final:
                    p.rows[w.entry.index] = row
                    if p.base64 is not None:
                        p.base64[w.entry.index] = out.base64_row(i)
            finished = self.scheduler.complete(step)
            self.runner.free(self.scheduler.take_released())  # long inputs cancelled while their chunk ran
            done = [self._pending.pop(rid) for rid in finished if rid in self._pending]
        for p in done:
            timings = Timings(p.tokenize_s, p.started_at - p.queued_at, finished_at - p.started_at)
            result = EmbedResult(p.rows[:, : p.dims], p.token_counts, p.base64, timings)
            p.loop.call_soon_threadsafe(_set_result, p.future, result)


__all__ = ["Engine", "EmbedOptions", "EmbedResult", "StepObserver", "Timings"]

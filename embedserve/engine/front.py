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
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from embedserve.config import EngineConfig, ModelConfig
from embedserve.engine import cpu as cpu_caps
from embedserve.engine.calibration import CALIBRATION_TEXTS
from embedserve.engine.device import (
    bind_thread,
    keep_blocks_on_the_heap,
    release_cached_memory,
    release_host_memory,
    resolve_device,
    resolve_dtype,
)
from embedserve.engine.faults import classify, injected, run_in_parts
from embedserve.engine.interface import EmbedOptions, EmbedResult, EngineInfo, StepObserver, Timings
from embedserve.engine.runner import Chunk, Runner, StepHandle
from embedserve.engine.scheduler import Entry, Scheduler, Step, Work, resolve_budgets
from embedserve.engine.token_ids import cl100k
from embedserve.engine.tokenizer import Tokenizer
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
from embedserve.kernels.attention import measure_solo_min, select_backend
from embedserve.kernels.linear import (
    Int8Linear,
    LinearPlan,
    int8_available,
    int8_gemm,
    int8_weight_max,
    quantize_int8,
    select_linear_backend,
)
from embedserve.kernels.pool_encode import select_pool_backend
from embedserve.models.classifier import ChatTemplate, apply_activation
from embedserve.models.hub import resolve as resolve_model
from embedserve.models.sentence import LoadedModel, load_model

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
        self.device = resolve_device(config.model.device)
        bind_thread(self.device)
        int8 = config.model.quantize == "int8"
        if int8 and self.device.type != "cpu":
            raise ConfigError(f"--quantize int8 runs on the CPU only (this model is on {self.device}); on a GPU "
                              f"serve bfloat16 (--dtype auto)")
        self.dtype = torch.float32 if int8 else resolve_dtype(config.model.dtype, self.device)
        if self.device.type == "cpu":
            self._check_cpu_dtype(config.model.dtype, int8)
            keep_blocks_on_the_heap()
        if int8 and (why := int8_available()) is not None:
            raise ConfigError(f"--quantize int8: {why}")
        started = time.perf_counter()
        self.source = resolve_model(config.model.path, config.model.revision)  # may download from the Hub
        self.model: LoadedModel = load_model(self.source.directory, dtype=self.dtype, device=self.device,
                                             kind=config.model.kind)
        self._configure_prompts(config.model)
        backend = select_linear_backend(self.device, self.dtype)
        # On the CPU whether the fused GEMM beats F.linear depends on the CPU and the shape: measured per shape.
        self.linear_plan = LinearPlan(backend, probe=self.device.type == "cpu" and not int8)
        self.linear_backend = backend + (" or torch, measured per shape" if self.linear_plan.probe else "")
        self.model.encoder.linear_plan = self.linear_plan
        max_length = self.model.max_length
        if config.max_input_tokens is not None:
            max_length = min(max_length, config.max_input_tokens)
        self.tokenizer = Tokenizer(
            self.model.directory, max_length=max_length, do_lower_case=self.model.spec.do_lower_case,
            cap_to_tokenizer=self.model.spec.max_seq_length is None,
        )
        template = self.model.classifier.template if self.model.classifier is not None else None
        if isinstance(template, ChatTemplate):
            self.tokenizer.use_chat_template(dict(template.kwargs), template.system, template.restore_suffix)
        elif template is not None:
            self.tokenizer.use_template(template.prefix, template.suffix)
        self.max_length = self.tokenizer.max_length
        # Ids must fit the embedding table, not only the tokenizer: on CUDA an id past the table is a
        # device-side assert that takes the whole process down.
        # Cross-encoders whose tokenizer marks a pair's second text (BERT's token type 1) get the types packed.
        types = getattr(self.model.encoder, "token_type_embeddings", None)
        self._token_types = self.model.head is not None and types is not None and types.weight.shape[0] > 1
        rows = self.model.encoder.embedding_rows
        self.id_limit = min(self.tokenizer.vocab_size, rows)
        self._text_ids_may_overflow = self.tokenizer.vocab_size > rows
        if self._text_ids_may_overflow:
            log.warning(
                "the tokenizer has %d tokens but the model's embedding table %d rows: texts that tokenize to an "
                "id past the table are refused with 400", self.tokenizer.vocab_size, rows,
            )
        if config.token_ids == "cl100k":
            cl100k()  # build the id table now, on the loading thread, not inside the first request
        # Test hook: a step holding an input equal to this text's tokens fails as --fault-kind says.
        self._fault_ids = (
            self.tokenizer.encode([config.fault_marker], truncate=True)[0] if config.fault_marker else None
        )
        sc = config.scheduler
        budgets = resolve_budgets(sc, device_type=self.device.type, max_length=self.max_length,
                                  can_chunk=bool(getattr(self.model.encoder, "supports_chunking", False)))
        self.max_batch_tokens = budgets.max_batch_tokens
        self.chunk_tokens: int | None = budgets.chunk_tokens
        self.max_kv_tokens: int | None = budgets.max_kv_tokens
        chunking = self.chunk_tokens is not None
        # The attention backend is chosen for this model: its heads, windows and chunks, on this torch.
        shape = self.model.encoder.attention_shape
        if not chunking:
            shape = dataclasses.replace(shape, chunked=False)
        try:
            self.attention_backend = select_backend(self.device, config.model.attention, self.dtype, shape)
        except ValueError as e:
            raise ConfigError(f"--attention {config.model.attention}: {e}") from e
        self.model.encoder.attention_backend = self.attention_backend
        if self.device.type == "cpu" and self.attention_backend == "sdpa_bucketed":
            solo_min, timings = measure_solo_min(shape, self.dtype)
            self.model.encoder.attention_solo_min = solo_min
            log.info("attention: sequences of %d tokens or more run one call each, shorter ones bucketed (measured, "
                     "bucketed/one each per length: %s)", solo_min, timings)
        self.scheduler = Scheduler(
            max_batch_tokens=self.max_batch_tokens,
            max_batch_requests=sc.max_batch_requests,
            max_queue=sc.max_queue,
            chunk_tokens=self.chunk_tokens,
            max_kv_tokens=self.max_kv_tokens,
        )
        self.pool_backend = select_pool_backend(self.device, config.model.pool_kernel)
        self.runner = Runner(self.model, self.pool_backend)
        if int8:
            self._quantize_int8()
        self._depth = pipeline_depth or (2 if self.device.type == "cuda" else 1)
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
        classifier = self.model.classifier
        self.info = EngineInfo(
            name=self.name, kind=self.model.kind, dimensions=self.model.dimensions, max_input_length=self.max_length,
            max_batch_tokens=self.max_batch_tokens, max_batch_requests=sc.max_batch_requests, max_queue=sc.max_queue,
            id_limit=self.id_limit, pooling=self.model.spec.pooling if classifier is None else None,
            labels=tuple(classifier.labels) if classifier is not None else None,
            dtype=str(self.dtype).removeprefix("torch."), quantize=config.model.quantize, device=str(self.device),
            commit=self.source.commit, tokenizer_workers=config.tokenizer_workers,
        )
        hf = self.model.hf_config
        log.info("architecture: %s -> %s", (hf.get("architectures") or [hf.get("model_type")])[0],
                 self.model.encoder.describe())
        src = self.source
        log.info(
            "loaded %s in %.1fs: %s (%s) on %s, dtype %s, attention %s, linear %s, pool+encode %s, %s, "
            "dimensions %d, max input %d tokens, max batch %d tokens / %d inputs, %d step(s) in flight",
            f"{src.repo_id} (revision {src.revision or 'main'}, commit {src.commit})" if src.repo_id
            else self.model.directory, time.perf_counter() - started, type(self.model.encoder).__name__,
            self.model.kind, self.device, str(self.dtype).removeprefix("torch."), self.attention_backend,
            self.linear_backend, self.pool_backend, self._head_words(), self.model.dimensions, self.max_length,
            self.max_batch_tokens, sc.max_batch_requests, self._depth,
        )

    def _check_cpu_dtype(self, asked: str, int8: bool) -> None:
        """Log what this CPU computes natively and the dtype chosen; warn when a half precision asked for is
        emulated here (with what a short probe measured)."""
        info = cpu_caps.read_cpu()
        dtype = str(self.dtype).removeprefix("torch.")
        if int8:
            why = "quantize int8: int8 GEMMs, float32 between them"
        elif asked != "auto":
            why = "asked"
        else:
            why = "auto: native bf16" if info.bf16 else "auto: no native bf16"
        log.info("cpu: %s; dtype %s (%s)", info.describe(), dtype, why)
        warning = cpu_caps.emulation_warning(self.dtype, info)
        if warning is not None:
            log.warning("%s", warning)

    def _quantize_int8(self) -> None:
        """Calibrate on :data:`CALIBRATION_TEXTS` in float32, then swap the encoder's linear layers for int8."""
        started = time.perf_counter()
        # Texts whose ids the model's embedding table cannot hold are refused in serving; here they are skipped.
        ids = [x for x in self.tokenizer.encode(list(CALIBRATION_TEXTS), truncate=True) if x and max(x) < self.id_limit]
        weight_max = int8_weight_max()
        with self.linear_plan.calibrate() as absmax:
            for i in range(0, len(ids), 8):
                batch = ids[i : i + 8]
                self.runner.run(batch, [self.dimensions] * len(batch), [False] * len(batch))
        count = quantize_int8(self.model.encoder, absmax, weight_max=weight_max)
        total = sum(isinstance(m, torch.nn.Linear) for m in self.model.encoder.modules()) + count
        unsigned = sum(1 for m in self.model.encoder.modules() if isinstance(m, Int8Linear) and m.unsigned)
        widths = "8-bit weights" if weight_max == 127 else "7-bit weights" + (
            f"; {unsigned} narrowing layers 8-bit weights, 7-bit unsigned activations" if unsigned else "")
        self.linear_backend = f"int8 ({count} of {total} layers, {widths}, {int8_gemm()} GEMM)"
        log.info("int8: %d linear layers quantized (%s, %s GEMM) after calibrating on %d texts (%d tokens) in "
                 "%.2fs", count, widths, int8_gemm(), len(ids), sum(map(len, ids)), time.perf_counter() - started)

    def _configure_prompts(self, cfg: ModelConfig) -> None:
        """The configured prompts over the folder's; the default must be one of them."""
        spec = self.model.spec
        if not cfg.prompts and cfg.default_prompt_name is None:
            return
        prompts = {**spec.prompts, **dict(cfg.prompts)}
        default = spec.default_prompt_name if cfg.default_prompt_name is None else (cfg.default_prompt_name or None)
        if default is not None and default not in prompts:
            raise ConfigError(f"default_prompt_name {default!r} is not one of this model's prompts: "
                              f"{', '.join(sorted(prompts)) or 'none'}")
        self.model.spec = dataclasses.replace(spec, prompts=prompts, default_prompt_name=default)
        log.info("prompts: %s; default: %s", ", ".join(f"{k}={v!r}" for k, v in prompts.items()) or "none",
                 default or "none")

    def _head_words(self) -> str:
        m = self.model
        if m.classifier is not None:
            return (f"{type(m.head).__name__} -> {m.classifier.num_labels} label(s), {m.classifier.activation}"
                    f"{', token types' if self._token_types else ''}")
        return (f"pooling {m.spec.pooling}{f' + {len(m.dense)} dense' if len(m.dense) else ''}"
                f"{' + normalize' if m.spec.normalize else ''}")

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

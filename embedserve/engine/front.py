"""The async front the HTTP layer awaits: one :class:`Engine` per served model.

``Engine(config)`` loads the model (:mod:`~embedserve.engine.loading`: one frozen value), ``warmup()`` runs the
shapes serving will run (:mod:`~embedserve.engine.warmup`), ``start()`` starts its engine thread
(:mod:`~embedserve.engine.worker`). ``await engine.embed(inputs, options)`` / ``score(pairs)`` prepare the inputs
on a tokenisation pool (:mod:`~embedserve.engine.prepare`), queue every input with the engine thread, and wait on
a future it resolves; a request cancelled meanwhile (its client went away) drops its queued inputs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from embedserve.config import MAX_PRIORITY, EngineConfig
from embedserve.engine import compute, late
from embedserve.engine.calibration import OutputCalibration, OutputRanges
from embedserve.engine.device import names_the_cpu
from embedserve.engine.interface import EmbedOptions, EmbedResult, StepObserver, Timings
from embedserve.engine.loading import load
from embedserve.engine.prepare import ColbertInputs, Preparer
from embedserve.engine.tokenizer import run_abandonable
from embedserve.engine.turns import DeviceTurns
from embedserve.engine.warmup import warm_up
from embedserve.engine.worker import Worker
from embedserve.errors import InvalidRequest, Overloaded, WrongModelKind, quoted
from embedserve.kernels.pool_encode import ENCODINGS as ENCODING_CODES
from embedserve.kernels.pool_encode import encode_rows
from embedserve.models.classifier import apply_activation
from embedserve.models.multivector import maxsim

log = logging.getLogger(__name__)

# Characters (or token ids) of the requests accepted and not yet tokenized, per model: past it a request is
# answered 429 (Retry-After) at once rather than held in memory behind the tokenisation pool. Two requests of
# the largest body always fit.
MAX_PENDING_CHARS = 64 * 1024 * 1024
MAX_TOKENS_PER_ANSWER = 65_536  # /tokenize: tokens in one answer (about 4 MB of JSON); 400 beyond
LONG_INPUT = ("truncate", "error", "mean")  # what an input longer than the model gets


def _size(items: Sequence) -> int:
    """What a request hands the tokenisation pool: characters of its texts, or its token ids."""
    total = 0
    for x in items:
        if isinstance(x, tuple):
            total += sum(len(t) for t in x if t is not None)
        else:
            total += len(x)
    return total


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
        self.name = name or config.model.path
        # On the CPU the compute thread loads it, and runs its warm-up and steps (see engine.compute).
        self._on_cpu = names_the_cpu(config.model.device)
        self._run = compute.call if self._on_cpu else _now
        loaded = self._run(load, config, self.name, pipeline_depth=pipeline_depth)
        self.loaded = loaded
        # The parts the tests and the benchmarks look into, by name.
        self.device, self.dtype, self.source, self.model = loaded.device, loaded.dtype, loaded.source, loaded.model
        self.tokenizer, self.scheduler, self.runner, self.info = (loaded.tokenizer, loaded.scheduler, loaded.runner,
                                                                  loaded.info)
        self.linear_plan, self.linear_backend = loaded.kernels.linear, loaded.linear_backend
        self.attention_backend, self.pool_backend = loaded.kernels.attention, loaded.pool_backend
        self.max_length, self.id_limit = loaded.max_length, loaded.id_limit
        self.max_batch_tokens = loaded.budgets.max_batch_tokens
        self.chunk_tokens, self.max_kv_tokens = loaded.budgets.chunk_tokens, loaded.budgets.max_kv_tokens
        self._prep = Preparer(loaded, token_ids=config.token_ids)
        self.worker = Worker(loaded, name=self.name, observer=observer or StepObserver(),
                             fault_kind=config.fault_kind, on_fatal=on_fatal, turns=turns)
        self._tok_pool = ThreadPoolExecutor(config.tokenizer_workers, thread_name_prefix="embedserve-tokenize")
        self._pending_chars = 0  # waiting for or on the tokenisation pool (event-loop thread only)
        overlap = config.late_chunking_overlap
        self.late_chunking_overlap = min(256, self.max_length // 4) if overlap is None else overlap
        calibration = OutputCalibration.load(config.int8_calibration)
        self.output_ranges = OutputRanges(calibration, self.name, self._calibration_vectors)
        if self.kind == "embedding":
            log.info("%s: int8 / uint8 output ranges calibrate on %s, on the first request for them", self.name,
                     calibration.source)

    @property
    def dimensions(self) -> int:
        return self.model.dimensions

    @property
    def kind(self) -> str:
        return self.model.kind

    def queue_stats(self) -> tuple[int, int, int, int]:
        """(waiting inputs, waiting tokens, running inputs, inputs dropped by cancellation so far)."""
        return self.worker.queue_stats()

    def waiting_by_priority(self) -> dict[int, int]:
        """Inputs waiting, per priority level that has any."""
        return self.worker.waiting_by_priority()

    # -- lifecycle ------------------------------------------------------------------------------------
    def warmup(self) -> None:
        """Run the shapes serving will run before the first request (:func:`warm_up`)."""
        self._run(warm_up, self.loaded)

    def start(self) -> None:
        self.worker.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting work, finish every queued input, then stop the thread."""
        self.worker.stop(timeout)
        self._tok_pool.shutdown(wait=False, cancel_futures=True)

    # -- the async front ------------------------------------------------------------------------------
    async def embed(self, inputs: Sequence[str | Sequence[int]], options: EmbedOptions = EmbedOptions()) -> EmbedResult:
        """Embed a request's inputs (texts, or token ids in the model's vocabulary)."""
        if (options.sparse or options.include_sparse) and self.kind != "sparse" and self.model.lexical is None:
            raise WrongModelKind("sparse embeddings", self.kind, "sparse")
        if (options.multi_vector or options.include_multi_vector) and self.model.colbert is None:
            raise WrongModelKind("multi-vector embeddings", self.kind, "multi_vector")
        if not (options.sparse or options.multi_vector):
            if self.kind != "embedding":
                raise WrongModelKind("embeddings", self.kind, "embedding")
            for field in ("include_dense", "include_sparse", "include_multi_vector"):
                if getattr(options, field):
                    raise InvalidRequest(f"{field} adds an output to sparse or multi-vector ones: it needs "
                                         "encoding_format sparse or multi_vector", param=field)
        if not inputs:
            raise InvalidRequest("input must not be empty", param="input")
        long_input = self._long_input(options)
        truncate = long_input == "truncate"
        if options.query and options.prompt_name is None and "query" in self.model.spec.prompts:
            options = dataclasses.replace(options, prompt_name="query")  # as encode_query chooses it
        if self.kind == "sparse":
            return await self._embed_splade(inputs, options, truncate, long_input)
        dims = options.dimensions or self.dimensions
        if not 1 <= dims <= self.dimensions:
            raise InvalidRequest(
                f"dimensions must be between 1 and {self.dimensions} for this model, got {dims}", param="dimensions"
            )
        normalize = options.normalize
        if normalize is None:
            normalize = self.model.spec.normalize or options.dimensions is not None
        if options.sparse or options.multi_vector:
            return await self._embed_heads(inputs, options, truncate, long_input, dims, normalize)

        prompt = self.prompt(options.prompt_name)
        encodings = options.encodings
        for name in encodings:
            if name not in ENCODING_CODES:
                raise InvalidRequest(f"unknown output type {name!r}; supported: {', '.join(ENCODING_CODES)}",
                                     param="encoding_format")
        if dims % 8 and {"binary", "ubinary"} & set(encodings):
            raise InvalidRequest(f"binary and ubinary output pack 8 values per byte: the width must be a multiple "
                                 f"of 8, and this request's is {dims}", param="dimensions")
        ranges = await self.output_ranges.get(dims, normalize) if {"int8", "uint8"} & set(encodings) else None
        first = encodings[0] if encodings else None
        code = ENCODING_CODES[first] if first else 0
        ranges_first = ranges if first in ("int8", "uint8") else None
        if long_input == "mean" and not options.late_chunking:
            return await self._embed_mean(inputs, prompt, dims, normalize, encodings, ranges, options.priority)
        if options.late_chunking:
            overlap = options.late_chunking_overlap
            if overlap is None:
                overlap = self.late_chunking_overlap
            result = await self._submit(self._prep.document, (inputs, prompt, overlap), dims, normalize, code,
                                        ranges_first, priority=options.priority)
        else:
            args = (inputs, truncate, prompt, options.truncate_start)
            result = await self._submit(self._prep.texts, args, dims, normalize, code, ranges_first,
                                        priority=options.priority)
        if len(encodings) > 1:  # the device made the first; the others from the same vectors, on the host
            more = await self._host_compute(lambda: {name: encode_rows(result.vectors, name, ranges)
                                                     for name in encodings[1:]})
            result = dataclasses.replace(result, encoded={**result.encoded, **more})
        return result

    def _long_input(self, options: EmbedOptions) -> str:
        """What an over-long input gets: the request's long_input, else its truncate, else the server's."""
        if options.long_input is not None:
            long_input = options.long_input
        elif options.truncate is not None:
            long_input = "truncate" if options.truncate else "error"
        else:
            long_input = self.config.long_input or ("truncate" if self.config.truncate else "error")
        if long_input not in LONG_INPUT:
            raise InvalidRequest(f"long_input must be one of {', '.join(LONG_INPUT)}, got {long_input!r}",
                                 param="long_input")
        return long_input

    async def _embed_splade(self, inputs, options: EmbedOptions, truncate: bool, long_input: str) -> EmbedResult:
        """A SPLADE model's vectors: each input's nonzero weights (the ``top_k`` largest, if asked), by token id."""
        self._check_sparse(options, long_input, ("encoding_format", options.encodings),
                           ("dimensions", options.dimensions), ("include_dense", options.include_dense))
        prompt = self.prompt(options.prompt_name)
        if self.model.sparse.query is not None and (options.query or options.prompt_name == "query"):
            return _top_k(await self._static_query(inputs, truncate, prompt), options.top_k)
        args = (inputs, truncate, prompt, options.truncate_start)
        return _top_k(await self._submit(self._prep.texts, args, self.dimensions, False, priority=options.priority),
                      options.top_k)

    async def _static_query(self, inputs, truncate: bool, prompt: str) -> EmbedResult:
        """An inference-free SPLADE model's queries: each token the query holds (once), weighted by the model's
        query weights; no forward pass, only the tokenisation pool."""
        weights = self.model.sparse.query
        started = time.perf_counter()

        def weigh():
            ids = self._prep.bare(inputs, truncate, prompt)
            rows = []
            for x in ids:
                held = torch.tensor(sorted({t for t in x if t < len(weights)}), dtype=torch.long)
                w = weights[held]
                rows.append((held[w != 0], w[w != 0]))
            return ids, rows

        ids, rows = await self._on_pool(_size(inputs), weigh)
        return EmbedResult(torch.empty(len(ids), 0), [len(x) for x in ids],
                           timings=Timings(tokenize_s=time.perf_counter() - started), sparse=rows)

    async def _embed_heads(self, inputs, options: EmbedOptions, truncate: bool, long_input: str, dims: int,
                           normalize: bool) -> EmbedResult:
        """bge-m3: each input's lexical weights by token id and / or its per-token vectors, and (``include_dense``)
        its dense vector, all from one forward pass."""
        self._check_sparse(options, long_input, ("encoding_format", options.encodings),
                           ("dimensions", options.dimensions and not options.include_dense))
        if self.kind == "multi_vector":
            return await self._embed_colbert(inputs, options, truncate)
        sparse = options.sparse or options.include_sparse
        multi = options.multi_vector or options.include_multi_vector
        args = (inputs, truncate, self.prompt(options.prompt_name), options.truncate_start)
        result = await self._submit(self._prep.texts, args, dims, normalize, sparse=sparse, multi=int(multi),
                                    priority=options.priority)
        if sparse:
            result = _top_k(result, options.top_k)
        if not options.include_dense:
            result = dataclasses.replace(result, vectors=result.vectors[:, :0])
        return result

    async def _embed_colbert(self, inputs, options: EmbedOptions, truncate: bool) -> EmbedResult:
        """A PyLate ColBERT model's per-token vectors: queries (``options.query``) or documents."""
        if options.include_dense:
            raise InvalidRequest("include_dense does not apply to a ColBERT model: it has no dense vector",
                                 param="include_dense")
        if options.truncate_start:
            raise InvalidRequest("a ColBERT model's texts lose their end when cut (truncate END)", param="truncate")
        return await self._colbert(inputs, truncate, self.prompt(options.prompt_name), options.query,
                                   options.priority)

    async def _colbert(self, texts, truncate: bool, prompt: str, query: bool, priority: int | None) -> EmbedResult:
        """Queries' vectors (each token's, expansion included) or documents' (but the skiplist's)."""
        return await self._submit(self._prep.colbert, (texts, truncate, prompt, query), self.dimensions, False,
                                  multi=1 if query else 2, priority=priority)

    @staticmethod
    def _check_sparse(options: EmbedOptions, long_input: str, *fields: tuple[str, object]) -> None:
        fields += (("late_chunking", options.late_chunking), ("long_input", long_input == "mean"))
        for field, value in fields:
            if value:
                raise InvalidRequest(f"{field} does not apply to sparse or multi-vector outputs", param=field)
        if options.top_k is not None and options.top_k < 1:
            raise InvalidRequest(f"sparse_top_k must be a positive integer, got {options.top_k}", param="sparse_top_k")

    async def _embed_mean(self, inputs, prompt: str, dims: int, normalize: bool, encodings: tuple[str, ...],
                          ranges: torch.Tensor | None, priority: int | None) -> EmbedResult:
        """``long_input: mean``: an over-long input runs as consecutive windows, each pooled as the model pools
        (its Dense layers included, before Normalize); its vector is their mean weighted by each window's tokens,
        then cut and normalised as any other. Inputs that fit are one window: their vectors as usual."""
        owners: list[int] = []

        def prepare(inputs, prompt):
            runs, found = self._prep.windows(inputs, prompt)
            owners.extend(found)
            return runs

        result = await self._submit(prepare, (inputs, prompt), self.dimensions, False, priority=priority)

        def means():
            owner = torch.tensor(owners)
            weights = torch.tensor(result.token_counts, dtype=torch.float32)
            sums = torch.zeros(len(inputs), self.dimensions).index_add_(0, owner, result.vectors * weights[:, None])
            total = torch.zeros(len(inputs)).index_add_(0, owner, weights)
            vectors = (sums / total[:, None])[:, :dims]
            if normalize:
                vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp(min=1e-12)
            counts = torch.zeros(len(inputs), dtype=torch.long).index_add_(0, owner, weights.long()).tolist()
            return EmbedResult(vectors, counts, {name: encode_rows(vectors, name, ranges) for name in encodings},
                               result.timings)

        return await self._host_compute(means)

    async def _calibration_vectors(self, texts: tuple[str, ...]) -> tuple[torch.Tensor, int]:
        """Texts' full-width vectors before normalisation, as a request without ``prompt_name`` would embed them,
        queued at most half the queue at a time; and their tokens."""
        parts, tokens = [], 0
        size = max(1, self.info.max_queue // 2)
        for i in range(0, len(texts), size):
            args = (texts[i : i + size], True, self.prompt(None))
            result = await self._submit(self._prep.texts, args, self.dimensions, False, limited=False)
            parts.append(result.vectors)
            tokens += result.total_tokens
        return torch.cat(parts), tokens

    async def score(self, pairs: Sequence[tuple[str, str | None]], *, truncate: bool | None = None,
                    max_doc_tokens: int | None = None, route: str = "rerank", priority: int | None = None
                    ) -> EmbedResult:
        """Score (query, document) pairs with a cross-encoder or classifier (single texts: None as the second
        element). ``vectors`` holds the raw logits ``[n, labels]``; :func:`apply_activation` gives the scores.
        ``max_doc_tokens``: each document cut to that many tokens first."""
        if self.model.head is None and not (self.kind == "multi_vector" and route == "rerank"):
            raise WrongModelKind(route, self.kind, "rerank")
        if not pairs:
            raise InvalidRequest("there is nothing to score", param="documents")
        truncate = self.config.truncate if truncate is None else truncate
        if self.kind == "multi_vector":
            return await self._maxsim(pairs, truncate, max_doc_tokens, priority)
        return await self._submit(self._prep.pairs, (pairs, truncate, max_doc_tokens), self.dimensions, False,
                                  priority=priority)

    async def _maxsim(self, pairs: Sequence[tuple[str, str | None]], truncate: bool, max_doc_tokens: int | None,
                      priority: int | None) -> EmbedResult:
        """A ColBERT model's scores: each query's vectors and each document's, then MaxSim (PyLate's
        ``rank.rerank``). Each distinct query is embedded once; ``vectors`` holds ``[n, 1]`` scores."""
        if any(d is None for _, d in pairs):
            raise InvalidRequest("a ColBERT model scores (query, document) pairs, not single texts", param="inputs")
        queries = list(dict.fromkeys(q for q, _ in pairs))
        docs = [d for _, d in pairs]
        if max_doc_tokens is not None:
            docs = await self._on_pool(_size(docs), self.tokenizer.cut, docs, max_doc_tokens)
        prompt = self.prompt(None)
        q_result, d_result = await asyncio.gather(self._colbert(queries, truncate, prompt, True, priority),
                                                  self._colbert(docs, truncate, prompt, False, priority))
        which = {q: i for i, q in enumerate(queries)}

        def score_all():
            scores = torch.empty(len(pairs), 1)
            for q, rows in _by_query(pairs, which).items():
                scores[rows, 0] = maxsim(q_result.multi[q], [d_result.multi[i] for i in rows])
            return scores

        scores = await self._host_compute(score_all)
        t_q, t_d = q_result.timings, d_result.timings
        timings = Timings(max(t_q.tokenize_s, t_d.tokenize_s), max(t_q.queue_s, t_d.queue_s),
                          max(t_q.inference_s, t_d.inference_s), min(t_q.queued_at, t_d.queued_at),
                          tuple(sorted(set(t_q.steps) | set(t_d.steps), key=lambda s: s.start)))
        return EmbedResult(scores, [sum(q_result.token_counts) + sum(d_result.token_counts)], timings=timings)

    def scores(self, logits: torch.Tensor, *, raw: bool = False, activation: str | None = None) -> torch.Tensor:
        """:meth:`score`'s logits as scores: the model's declared activation, the one named, or raw (a ColBERT
        model's MaxSim scores are always raw)."""
        if raw or self.model.classifier is None:
            return logits
        return apply_activation(logits, activation or self.model.classifier.activation)

    async def _submit(self, prepare, args: tuple, dims: int, normalize: bool, encoding: int = 0,
                      ranges: torch.Tensor | None = None, *, limited: bool = True, sparse: bool = False,
                      multi: int = 0, priority: int | None = None) -> EmbedResult:
        """Tokenize on the pool (``prepare(*args)`` -> ids, or (ids, type starts)), queue every input, and
        wait for the engine thread to finish them all. ``limited``: held to --max-tokens-per-request; ``sparse``:
        bge-m3's lexical weights too; ``multi``: per-token vectors too (:meth:`Worker.submit`); ``priority``:
        0-999, lower first (None: the model's --default-priority)."""
        priority = self.config.scheduler.default_priority if priority is None else priority
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= MAX_PRIORITY:
            raise InvalidRequest(f"priority must be an integer from 0 (first) to {MAX_PRIORITY}, got "
                                 f"{quoted(priority)}", param="priority")
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            prepared = await self._on_pool(_size(args[0]), prepare, *args)
        except asyncio.CancelledError:
            log.info("request cancelled while tokenizing %d inputs: nothing was queued", len(args[0]))
            raise
        spans = chunk_tokens = tails = None
        if isinstance(prepared, ColbertInputs):
            ids, type_starts, tails = prepared.ids, None, prepared.tails
        elif isinstance(prepared, late.Plan):
            ids, type_starts, spans, chunk_tokens = prepared.inputs, None, prepared.spans, prepared.chunk_tokens
        else:
            ids, type_starts = prepared if isinstance(prepared, tuple) else (prepared, None)
        tokenized = time.perf_counter()
        counts = [len(x) for x in ids]
        limit = self.config.max_tokens_per_request
        if limited and limit is not None and sum(counts) > limit:
            raise InvalidRequest(
                f"The request holds {sum(counts)} tokens; this server accepts at most {limit} per request "
                "(--max-tokens-per-request). Split it into smaller requests.",
                param="input", code="request_too_large",
            )
        rid, fut = self.worker.submit(loop, ids, type_starts, dims=dims, normalize=normalize, encoding=encoding,
                                      ranges=ranges, tokenize_s=tokenized - started, queued_at=tokenized,
                                      spans=spans, chunk_tokens=chunk_tokens, sparse=sparse, multi=multi,
                                      tails=tails, priority=priority)
        try:
            return await fut
        except asyncio.CancelledError:
            dropped = self.worker.cancel(rid)
            log.info("request %d cancelled: %d of its %d inputs dropped from the queue", rid, dropped, len(ids))
            raise

    async def tokenize(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[tuple]]:
        """Each text's tokens as (id, text, special, start, stop), on the tokenisation pool."""
        return await self._on_pool(_size(texts), lambda: self.tokenizer.tokens(
            texts, add_special_tokens=add_special_tokens, max_total=MAX_TOKENS_PER_ANSWER))

    async def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """Token ids (each below ``info.id_limit``) back to text, on the tokenisation pool."""
        return await self._on_pool(_size(ids), lambda: self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens))

    async def _host_compute(self, fn):
        """``fn()``: a request's own torch work after its steps (late chunking's means, MaxSim, a second output
        type). On the CPU it runs on the compute thread, awaited: on the event loop's thread a large enough op
        would start a second OpenMP team and slow every step after it (engine.compute). It waits behind at most
        the step running there."""
        if not self._on_cpu:
            return fn()
        return await asyncio.wrap_future(compute.submit(fn))

    async def _on_pool(self, size: int, fn, *args):
        """``fn(*args)`` on the tokenisation pool, counted against :data:`MAX_PENDING_CHARS` until it is done."""
        if self._pending_chars and self._pending_chars + size > MAX_PENDING_CHARS:
            raise Overloaded(f"{self._pending_chars} characters of earlier requests wait for the tokenizer; retry "
                             "shortly.", retry_after_s=1.0)
        self._pending_chars += size
        abandoned = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._tok_pool, run_abandonable, abandoned, fn,
                                                                    *args)
        except asyncio.CancelledError:
            abandoned.set()  # the client went away: long texts stop being read at their next window
            raise
        finally:
            self._pending_chars -= size

    def prompt(self, name: str | None) -> str:
        """The text of one of the model's prompts (None: its default prompt, if any); unknown is a 400."""
        return self._prep.prompt(name)


def _now(fn, *args, **kw):
    return fn(*args, **kw)


def _by_query(pairs: Sequence[tuple[str, str | None]], which: dict[str, int]) -> dict[int, list[int]]:
    """Pair indices grouped by their query's index."""
    rows: dict[int, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        rows.setdefault(which[q], []).append(i)
    return rows


def _top_k(result: EmbedResult, k: int | None) -> EmbedResult:
    """Each sparse vector's ``k`` largest weights (all when None), still by token id."""
    if k is None:
        return result
    kept = []
    for ids, weights in result.sparse:
        if len(ids) > k:
            top = weights.topk(k).indices.sort().values
            ids, weights = ids[top], weights[top]
        kept.append((ids, weights))
    return dataclasses.replace(result, sparse=kept)


__all__ = ["Engine"]

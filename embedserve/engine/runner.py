"""The runner owns the model and its device: one step of packed inputs in, finished vectors out.

Only the engine thread calls it. :meth:`Runner.launch` stages a step and queues its work on the device
without waiting for it; :meth:`Runner.collect` waits for that step's results. On CUDA that is what lets the
engine pack and stage the next step while this one runs:

- staging: the token ids, positions, sequence offsets (query and key), dims, normalise flags, each row's wire
  encoding and its offsets are written into one pinned host buffer and copied to the device with one non-blocking copy;
- the forward pass reads its attention bookkeeping from host lengths: nothing in it waits on the device;
- one pool+encode launch turns the packed hidden states into final float32 rows and, for rows whose request
  asked for one, their wire encoding (offsets computed on the host): little-endian float32 base64, or int8 /
  uint8 / binary / ubinary with the request's calibrated ranges (one small float copy when a step has any);
- the rows and the encoded bytes are copied back into pinned host memory without waiting, and an event marks
  when they have landed.

On the CPU the same code runs with plain host tensors and no copies. With sentence-transformers Dense
layers, or a chunk of a long input in the step, the rows are pooled first (torch, on the device: chunks
carry pooling state across steps) and the Dense GEMMs run on them; the same kernel then finishes the rows as
one-token segments (cut, normalise, encode).

A launch that raises leaves the long inputs' state (key caches, running sums) as it found it, so that the
engine may retry the step's inputs in smaller groups after an out-of-memory.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from embedserve.kernels.pool_encode import IMPLS, encoded_lengths_host
from embedserve.kernels.pooling import pool
from embedserve.kernels.sparse import splade_pool
from embedserve.models.sentence import LoadedModel

log = logging.getLogger(__name__)

_ALIGN = 4  # int32 elements: each staged segment starts on a 16-byte boundary


@dataclass
class StepOutput:
    vectors: torch.Tensor  # [B, D] float32, CPU; row i final up to dims[i]
    encoded: bytes  # every row's encoding, back to back
    offsets: list[int]  # [B+1]: row i's is encoded[offsets[i]:offsets[i+1]] (empty if not asked)
    pieces: torch.Tensor | None = None  # [P, H] float32: the span sums of inputs that asked for spans
    piece_offsets: list[int] | None = None  # [B+1]: input i's spans' sums are pieces[piece_offsets[i]:...]
    token_weights: torch.Tensor | None = None  # [T] float32: bge-m3's lexical weight of every token of the step
    token_vectors: torch.Tensor | None = None  # [N, C] float32: the per-token vectors of the inputs that asked
    vector_offsets: list[int] | None = None  # [B+1]: input i's are token_vectors[vector_offsets[i]:...]

    def vectors_of(self, i: int) -> torch.Tensor | None:
        if self.token_vectors is None or self.vector_offsets[i] == self.vector_offsets[i + 1]:
            return None
        return self.token_vectors[self.vector_offsets[i] : self.vector_offsets[i + 1]]

    def encoded_row(self, i: int) -> bytes:
        return self.encoded[self.offsets[i] : self.offsets[i + 1]]

    def pieces_of(self, i: int) -> torch.Tensor | None:
        if self.pieces is None:
            return None
        return self.pieces[self.piece_offsets[i] : self.piece_offsets[i + 1]]


@dataclass
class StepHandle:
    """A launched step. Its results are in host memory once ``event`` has completed (None: already there)."""

    vectors: torch.Tensor  # [B, D] float32 on the host
    encoded: torch.Tensor  # [N] uint8 on the host
    offsets: list[int]
    event: Any = None  # torch.cuda.Event
    pieces: torch.Tensor | None = None  # [P, H] float32 on the host
    piece_offsets: list[int] | None = None
    token_weights: torch.Tensor | None = None  # [T] float32 on the host
    token_vectors: torch.Tensor | None = None  # [N, C] float32 on the host
    vector_offsets: list[int] | None = None


@dataclass(frozen=True)
class Chunk:
    """This input is one chunk of a long one: tokens [start, start + len) of ``total``."""

    key: Any
    start: int
    total: int
    final: bool


@dataclass
class _LongInput:
    cache: Any  # the model's KV cache
    sum: torch.Tensor | None = None  # [H] fp32, mean pooling's running sum
    first: torch.Tensor | None = None  # [H] fp32, CLS pooling's first token


@dataclass
class _Staged:
    ids: torch.Tensor  # [T] int32, on the device
    positions: torch.Tensor  # [T] int32
    cu: torch.Tensor  # [B+1] int32
    cu_k: torch.Tensor | None  # [B+1] int32, when chunks attend to cached keys
    dims: torch.Tensor  # [B] int32
    normalize: torch.Tensor  # [B] int32 (0/1)
    encodings: torch.Tensor  # [B] int32: pool_encode.ENCODINGS codes, 0 for none
    range_rows: torch.Tensor  # [B] int32: which of the step's ranges a quantized row uses
    enc_offsets: torch.Tensor  # [B+1] int32
    lengths: list[int]
    offsets: list[int]  # the encodings' offsets, host
    max_seqlen: int
    token_types: torch.Tensor | None = None  # [T] int32: 1 from each pair's second text on


class Runner:
    def __init__(self, model: LoadedModel, pool_backend: str = "torch") -> None:
        self.model = model
        self.device = model.device
        self.pool_backend = pool_backend
        self._pool_encode = IMPLS[pool_backend]
        self._long: dict[Any, _LongInput] = {}  # long inputs between chunks
        self._cuda = self.device.type == "cuda"

    @property
    def kv_inputs(self) -> int:
        return len(self._long)

    def free(self, keys: Sequence[Any]) -> None:
        """Drop the key caches of long inputs that were cancelled or failed (finished ones free themselves)."""
        for key in keys:
            self._long.pop(key, None)

    # -- staging ------------------------------------------------------------------------------------------------
    def _stage(
        self, inputs: Sequence[Sequence[int]], dims: Sequence[int], normalize: Sequence[bool],
        codes: Sequence[int], range_rows: Sequence[int], starts: list[int] | None,
        type_starts: Sequence[int] | None = None,
    ) -> _Staged:
        """Everything the device needs for a step, in one int32 buffer and one copy. Each segment starts on a
        16-byte boundary, whatever the step's token and input counts: Triton specialises a kernel on its
        pointers' alignment, so views at arbitrary offsets would compile new variants under live traffic."""
        B = len(inputs)
        lengths = [len(x) for x in inputs]
        T = sum(lengths)
        offsets = [0, *itertools.accumulate(encoded_lengths_host(dims, codes))]
        nk = B + 1 if starts is not None else 0
        nt = T if type_starts is not None else 0
        at: dict[str, int] = {}
        size = 0
        for name, n in (("ids", T), ("pos", T), ("cu", B + 1), ("cu_k", nk), ("dims", B), ("norm", B),
                        ("enc", B), ("rrow", B), ("off", B + 1), ("types", nt)):
            at[name] = size
            size += -(-n // _ALIGN) * _ALIGN
        host = torch.empty(size, dtype=torch.int32, pin_memory=self._cuda)
        a = host.numpy()

        def seg(name: str, n: int):
            return a[at[name] : at[name] + n]

        ids, pos, cu = seg("ids", T), seg("pos", T), seg("cu", B + 1)
        ids[:] = np.fromiter(itertools.chain.from_iterable(inputs), dtype=np.int32, count=T)
        cu[0] = 0
        np.cumsum(lengths, out=cu[1:])
        # Position within its own input for every packed token (a chunk continues where the last one ended).
        pos[:] = np.arange(T, dtype=np.int32) - np.repeat(cu[:-1], lengths)
        if starts is not None:
            pos += np.repeat(np.asarray(starts, dtype=np.int32), lengths)
            cu_k = seg("cu_k", nk)
            cu_k[0] = 0
            np.cumsum(np.asarray(lengths) + np.asarray(starts), out=cu_k[1:])
        seg("dims", B)[:] = dims
        seg("norm", B)[:] = normalize
        seg("enc", B)[:] = codes
        seg("rrow", B)[:] = range_rows
        seg("off", B + 1)[:] = offsets
        if type_starts is not None:
            # Token type 1 from the second text of a pair on; a single text's start is its length.
            seg("types", T)[:] = pos >= np.repeat(np.asarray(type_starts, dtype=np.int32), lengths)
        dev = host.to(self.device, non_blocking=True) if self._cuda else host

        def view(name: str, n: int) -> torch.Tensor:
            return dev[at[name] : at[name] + n]

        return _Staged(
            ids=view("ids", T), positions=view("pos", T), cu=view("cu", B + 1),
            cu_k=view("cu_k", nk) if starts is not None else None,
            dims=view("dims", B), normalize=view("norm", B), encodings=view("enc", B), range_rows=view("rrow", B),
            enc_offsets=view("off", B + 1), lengths=lengths,
            offsets=offsets, max_seqlen=max(lengths),
            token_types=view("types", T) if type_starts is not None else None,
        )

    # -- long inputs' state ---------------------------------------------------------------------------------------
    def _snapshot(self, chunks: Sequence[Chunk | None]) -> list[tuple[Any, _LongInput | None, int, Any, Any]]:
        out = []
        for c in chunks:
            if c is not None:
                state = self._long.get(c.key)
                if state is None:
                    out.append((c.key, None, 0, None, None))
                else:
                    out.append((c.key, state, state.cache.filled, state.sum, state.first))
        return out

    def _restore(self, snapshot) -> None:
        for key, state, filled, total, first in snapshot:
            if state is None:
                self._long.pop(key, None)
            else:
                state.cache.filled, state.sum, state.first = filled, total, first
                self._long[key] = state

    def _pool_chunks(
        self, hidden: torch.Tensor, cu: torch.Tensor, chunks: Sequence[Chunk | None], lengths: list[int]
    ) -> torch.Tensor:
        """Pooled ``[B, H]`` fp32 rows where a chunked input's row (on its final chunk) pools the whole input:
        mean from a running fp32 sum and count, CLS from its first chunk, last token from its last."""
        mode = self.model.spec.pooling
        rows = pool(hidden, cu, mode)  # [B, H]: per chunk for now
        for i, c in enumerate(chunks):
            if c is None:
                continue
            state = self._long[c.key]
            if mode == "mean":
                part = rows[i] * lengths[i]
                state.sum = part if state.sum is None else state.sum + part
                if c.final:
                    rows[i] = state.sum / c.total
            elif mode == "cls":
                if c.start == 0:
                    state.first = rows[i].clone()
                rows[i] = state.first
            if c.final:
                del self._long[c.key]
        return rows

    def _ranges_table(self, ranges: Sequence[torch.Tensor | None] | None, B: int
                      ) -> tuple[torch.Tensor | None, list[int]]:
        """The distinct ranges of a step's int8 / uint8 rows as one ``[R, 2, D]`` float32 tensor on the device
        (None when the step has none), and each row's index into it."""
        rows, distinct = [0] * B, {}
        for i, r in enumerate(ranges or ()):
            if r is not None:
                rows[i] = distinct.setdefault(id(r), (len(distinct), r))[0]
        if not distinct:
            return None, rows
        table = torch.zeros(len(distinct), 2, self.model.dimensions, pin_memory=self._cuda)
        for j, r in distinct.values():
            table[j, :, : r.shape[1]] = r
        return table.to(self.device, non_blocking=True), rows

    # -- a step ---------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(
        self,
        inputs: Sequence[Sequence[int]],
        dims: Sequence[int],
        normalize: Sequence[bool],
        encodings: Sequence[int] | None = None,
        chunks: Sequence[Chunk | None] | None = None,
        type_starts: Sequence[int] | None = None,
        ranges: Sequence[torch.Tensor | None] | None = None,
        spans: Sequence[Sequence[tuple[int, int, int]] | None] | None = None,
        multi: Sequence[int] | None = None,
        weigh: bool = False,
        tails: Sequence[int] | None = None,
    ) -> StepHandle:
        """Stage one packed step and queue its work on the device. ``encodings``: each row's wire encoding
        (:data:`~embedserve.kernels.pool_encode.ENCODINGS` codes, 0 for none), with ``ranges``: the ``[2, dims]``
        ranges of each int8 / uint8 row (None for the others). With ``chunks``, some inputs are chunks of long
        ones; their rows are meaningful only on their final chunk. ``type_starts``: for (query, document) pairs,
        where each input's second text begins (token type 1 from there). ``spans``: for a late-chunked
        document's inputs, token ranges ``(lo, hi, _)`` in the input's own positions whose final hidden states are
        summed (fp32, before any Dense layer), each over the part of it this step runs. ``multi``: which inputs
        also want their per-token vectors (0: none; 1: every token's that the model gives one; 2: the same but
        those of a PyLate model's skiplist); ``weigh``: some input wants its lexical weights (bge-m3's).
        ``tails``: per input, how many of its last tokens no token attends to (a ColBERT query's hidden
        expansion)."""
        m = self.model
        dev = self.device
        B = len(inputs)
        codes = list(encodings) if encodings is not None else [0] * B
        table, range_rows = self._ranges_table(ranges, B)
        if chunks is not None and all(c is None for c in chunks):
            chunks = None
        snapshot = self._snapshot(chunks) if chunks is not None else []
        try:
            st = self._stage(inputs, dims, normalize, codes, range_rows,
                             [c.start if c else 0 for c in chunks] if chunks else None, type_starts)
            enc = dict(offsets=st.enc_offsets, total=st.offsets[-1], ranges=table, range_rows=st.range_rows)
            if chunks is not None:
                caches = []
                for c in chunks:
                    if c is None:
                        caches.append(None)
                        continue
                    if c.start == 0:
                        self._long[c.key] = _LongInput(m.encoder.new_cache(c.total, dev))
                    caches.append(self._long[c.key].cache)
                hidden = m.encoder(st.ids, st.positions, st.cu, st.max_seqlen, caches, lengths=st.lengths,
                                   cu_seqlens_k=st.cu_k)  # [T, H]
            else:
                extra = {} if st.token_types is None else {"token_types": st.token_types}
                if tails is not None and any(tails):
                    extra["tails"] = list(tails)
                hidden = m.encoder(st.ids, st.positions, st.cu, st.max_seqlen, lengths=st.lengths, **extra)  # [T, H]
            pieces, piece_offsets = self._span_sums(hidden, st.lengths, chunks, spans)
            # bge-m3: every token's lexical weight (a dot product per token), beside the dense rows
            weights = m.lexical(hidden, st.ids) if m.lexical is not None and weigh else None
            token_vectors, vector_offsets = self._token_vectors(hidden, inputs, multi)
            if m.head is not None:
                # A cross-encoder, classifier or causal-LM reranker: [B, labels] float32 logits, no bytes. The
                # head reads each sequence's first or last token; a long input's row counts on its final chunk.
                vectors, encoded = m.head(hidden, st.cu), torch.empty(0, dtype=torch.uint8, device=dev)
                for c in chunks or ():
                    if c is not None and c.final:
                        del self._long[c.key]
            elif m.colbert is not None and m.colbert.pylate is not None:
                # A ColBERT model: its per-token vectors are its only output.
                vectors = torch.empty(B, 0, device=dev)
                encoded = torch.empty(0, dtype=torch.uint8, device=dev)
            elif m.sparse is not None:
                # SPLADE: [B, V] weights, the masked-LM logits made and pooled a block of tokens at a time.
                vectors = splade_pool(hidden, m.sparse.head, st.cu, m.dimensions, m.sparse.spec.mode,
                                      m.sparse.spec.activation, impl=self.pool_backend)
                encoded = torch.empty(0, dtype=torch.uint8, device=dev)
            elif chunks is None and not len(m.dense):
                # The common case: one launch pools, cuts, normalises and encodes.
                vectors, encoded, _ = self._pool_encode(hidden, st.cu, m.spec.pooling, st.dims, st.normalize,
                                                        st.encodings, **enc)
            else:
                # Pooled rows first (chunks carry state across steps; Dense layers sit between pooling and the
                # cut), then the same kernel finishes them as one-token segments.
                if chunks is not None:
                    x = self._pool_chunks(hidden, st.cu, chunks, st.lengths)
                else:
                    x = pool(hidden, st.cu, m.spec.pooling)
                vectors, encoded = self._dense_and_finish(x, st, enc)
            if not self._cuda:
                return StepHandle(vectors, encoded, st.offsets, None, pieces, piece_offsets, weights, token_vectors,
                                  vector_offsets)
            made = (vectors, encoded, pieces, weights, token_vectors)
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if t is not None else None for t in made]
            for h, t in zip(host, made):
                if t is not None:
                    h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return StepHandle(host[0], host[1], st.offsets, event, host[2], piece_offsets, host[3], host[4],
                              vector_offsets)
        except BaseException:
            self._restore(snapshot)  # the long inputs are where they were: the step may be retried
            raise

    def collect(self, handle: StepHandle) -> StepOutput:
        """Wait for a launched step's results (a device error of the step surfaces here or at a later launch)."""
        if handle.event is not None:
            handle.event.synchronize()
        return StepOutput(handle.vectors, handle.encoded.numpy().tobytes(), handle.offsets, handle.pieces,
                          handle.piece_offsets, handle.token_weights, handle.token_vectors, handle.vector_offsets)

    def _dense_and_finish(self, x: torch.Tensor, st: _Staged, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled ``[B, H]`` rows through the model's Dense layers, then cut, normalised and encoded by the
        pool+encode kernel as one-token segments."""
        m = self.model
        if len(m.dense):
            x = x.to(m.dtype)
            for layer in m.dense:
                x = layer(x)  # [B, D]
        ones = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=self.device)
        vectors, encoded, _ = self._pool_encode(x, ones, "cls", st.dims, st.normalize, st.encodings, **enc)
        return vectors, encoded

    def _token_vectors(self, hidden: torch.Tensor, inputs: Sequence[Sequence[int]], multi: Sequence[int] | None
                       ) -> tuple[torch.Tensor | None, list[int] | None]:
        """The per-token vectors of the inputs that asked (``[N, C]`` float32, each normalised by the pool+encode
        kernel as one-token segments), and each input's first row."""
        head = self.model.colbert
        if head is None or not multi or not any(multi):
            return None, None
        skip = np.fromiter(head.tokens.skiplist, dtype=np.int64) if head.tokens is not None else None
        tokens, offsets, at = [], [0], 0
        for x, mode in zip(inputs, multi):
            n = len(x)
            kept = np.arange(at + head.skip_first, at + n) if mode and n > head.skip_first else np.empty(0, np.int64)
            if mode == 2 and skip is not None and len(skip):
                kept = kept[~np.isin(np.asarray(x[head.skip_first:]), skip)]
            tokens.append(kept)
            offsets.append(offsets[-1] + len(kept))
            at += n
        if not offsets[-1]:
            return None, None
        x = head(hidden.index_select(0, torch.from_numpy(np.concatenate(tokens)).to(hidden.device)))
        n, dev = x.shape[0], hidden.device
        ones = torch.arange(n + 1, dtype=torch.int32, device=dev)
        width = torch.full((n,), head.width, dtype=torch.int32, device=dev)
        vectors, _, _ = self._pool_encode(x, ones, "cls", width, torch.ones(n, dtype=torch.int32, device=dev),
                                          torch.zeros(n, dtype=torch.int32, device=dev))
        return vectors, offsets

    def _span_sums(self, hidden: torch.Tensor, lengths: list[int], chunks: Sequence[Chunk | None] | None,
                   spans) -> tuple[torch.Tensor | None, list[int] | None]:
        """Each span's sum of final hidden states over the tokens of it this step holds: ``[P, H]`` float32, one
        row per span of every input that has spans (zero where the step holds none of it), and each input's
        first row."""
        if not spans or not any(spans):
            return None, None
        tokens, rows, offsets, at = [], [], [0], 0
        for i, input_spans in enumerate(spans):
            begin = chunks[i].start if chunks is not None and chunks[i] is not None else 0
            for j, (lo, hi, _) in enumerate(input_spans or ()):
                a, b = max(lo, begin), min(hi, begin + lengths[i])
                if a < b:
                    tokens.append(np.arange(at + a - begin, at + b - begin))
                    rows.append(np.full(b - a, offsets[-1] + j))
            offsets.append(offsets[-1] + len(input_spans or ()))
            at += lengths[i]
        sums = torch.zeros(offsets[-1], hidden.shape[1], dtype=torch.float32, device=hidden.device)
        if tokens:
            index = torch.from_numpy(np.concatenate(tokens)).to(hidden.device)
            target = torch.from_numpy(np.concatenate(rows)).to(hidden.device)
            sums.index_add_(0, target, hidden.index_select(0, index).float())
        return sums, offsets

    @torch.inference_mode()
    def finish(self, x: torch.Tensor, dims: Sequence[int], normalize: Sequence[bool], encodings: Sequence[int],
               ranges: Sequence[torch.Tensor | None]) -> StepOutput:
        """Rows pooled elsewhere (a late-chunked document's chunk means, ``[n, H]`` fp32 on the host) through
        the Dense layers, the cut, normalisation and encoding, waited for."""
        n = x.shape[0]
        table, range_rows = self._ranges_table(ranges, n)
        st = self._stage([[0]] * n, dims, normalize, encodings, range_rows, None)
        enc = dict(offsets=st.enc_offsets, total=st.offsets[-1], ranges=table, range_rows=st.range_rows)
        vectors, encoded = self._dense_and_finish(x.to(self.device), st, enc)
        return StepOutput(vectors.cpu(), encoded.cpu().numpy().tobytes(), st.offsets)

    def run(self, *args, **kw) -> StepOutput:
        """:meth:`launch` one step (same arguments) and wait for it."""
        return self.collect(self.launch(*args, **kw))

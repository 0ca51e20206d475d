"""The runner owns the model and its device: one step of packed inputs in, finished vectors out.

Only the engine thread calls :meth:`Runner.run`. After the forward pass one pool+encode launch turns the
packed hidden states into final float32 rows and, for rows whose request asked for base64, their
little-endian float32 base64 text. With sentence-transformers Dense layers, or a chunk of a long input
in the step, the rows are pooled first (torch, on the device: chunks carry pooling state across steps)
and the Dense GEMMs run on them; the same kernel then finishes the rows as one-token segments (cut,
normalise, encode). Folding GEMMs into the kernel would buy nothing and cost a second implementation.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from embedserve.kernels.pool_encode import IMPLS
from embedserve.kernels.pooling import pool
from embedserve.models.sentence import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    vectors: torch.Tensor  # [B, D] float32, CPU; row i final up to dims[i]
    b64: bytes  # every base64 row, back to back
    offsets: list[int]  # [B+1]: row i's base64 is b64[offsets[i]:offsets[i+1]] (empty if not asked)

    def base64_row(self, i: int) -> bytes:
        return self.b64[self.offsets[i] : self.offsets[i + 1]]


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


class Runner:
    def __init__(self, model: LoadedModel, pool_backend: str = "torch") -> None:
        self.model = model
        self.device = model.device
        self.pool_backend = pool_backend
        self._pool_encode = IMPLS[pool_backend]
        self._long: dict[Any, _LongInput] = {}  # long inputs between chunks

    @property
    def kv_inputs(self) -> int:
        return len(self._long)

    def free(self, keys: Sequence[Any]) -> None:
        """Drop the key caches of long inputs that were cancelled (finished ones free themselves)."""
        for key in keys:
            self._long.pop(key, None)

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

    @torch.inference_mode()
    def run(
        self,
        inputs: Sequence[Sequence[int]],
        dims: Sequence[int],
        normalize: Sequence[bool],
        want_base64: Sequence[bool] | None = None,
        chunks: Sequence[Chunk | None] | None = None,
    ) -> StepOutput:
        """Embed one packed step. With ``chunks``, some inputs are chunks of long ones; their rows are
        meaningful only on their final chunk."""
        m = self.model
        dev = self.device
        B = len(inputs)
        lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int32)
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        input_ids = torch.tensor(list(itertools.chain.from_iterable(inputs)), dtype=torch.long)
        # Position within its own input for every packed token (a chunk continues where the last one ended).
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
        positions = torch.arange(total, dtype=torch.long) - starts
        caches: list | None = None
        if chunks is not None and any(c is not None for c in chunks):
            offsets = torch.tensor([c.start if c is not None else 0 for c in chunks], dtype=torch.long)
            positions += torch.repeat_interleave(offsets, lengths.long())
            caches = []
            for c in chunks:
                if c is None:
                    caches.append(None)
                    continue
                if c.start == 0:
                    self._long[c.key] = _LongInput(m.encoder.new_cache(c.total, dev))
                caches.append(self._long[c.key].cache)
        max_seqlen = int(lengths.max())
        cu_dev = cu_seqlens.to(dev, non_blocking=True)
        dims_t = torch.tensor(dims, dtype=torch.int32, device=dev)
        norm_t = torch.tensor(normalize, dtype=torch.bool, device=dev)
        want_t = torch.tensor(want_base64 if want_base64 is not None else [False] * B, dtype=torch.bool, device=dev)

        packed = (input_ids.to(dev), positions.to(dev), cu_dev, max_seqlen)
        try:
            hidden = m.encoder(*packed, caches) if caches else m.encoder(*packed)  # [T, H]
        except BaseException:
            if caches:
                self.free([c.key for c in chunks if c is not None])  # a half-written cache is useless
            raise
        if not caches and not len(m.dense):
            # The common case: one launch pools, cuts, normalises and encodes.
            vectors, b64, offsets = self._pool_encode(hidden, cu_dev, m.spec.pooling, dims_t, norm_t, want_t)
        else:
            # Pooled rows first (chunks carry state across steps; Dense layers sit between pooling and the
            # cut), then the same kernel finishes them as one-token segments.
            if caches:
                x = self._pool_chunks(hidden, cu_dev, chunks, lengths.tolist())
            else:
                x = pool(hidden, cu_dev, m.spec.pooling)
            if len(m.dense):
                x = x.to(m.dtype)
                for layer in m.dense:
                    x = layer(x)  # [B, D]
            ones = torch.arange(B + 1, dtype=torch.int32, device=dev)
            vectors, b64, offsets = self._pool_encode(x, ones, "cls", dims_t, norm_t, want_t)
        return StepOutput(vectors.cpu(), b64.cpu().numpy().tobytes(), offsets.cpu().tolist())

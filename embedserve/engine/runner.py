"""The runner owns the model and its device: one step of packed inputs in, finished vectors out.

Only the engine thread calls :meth:`Runner.run`. After the forward pass one pool+encode launch turns the
packed hidden states into final float32 rows and, for rows whose request asked for base64, their
little-endian float32 base64 text. A model with sentence-transformers Dense layers splits that launch
around them: pool (no cut, no normalisation) -> Dense -> the same kernel over one-token segments, which
cuts, normalises and encodes. The Dense layers are ordinary GEMMs; folding them into the kernel would
buy nothing and cost a second implementation.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from embedserve.kernels.pool_encode import IMPLS
from embedserve.models.sentence import LoadedModel

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    vectors: torch.Tensor  # [B, D] float32, CPU; row i final up to dims[i]
    b64: bytes  # every base64 row, back to back
    offsets: list[int]  # [B+1]: row i's base64 is b64[offsets[i]:offsets[i+1]] (empty if not asked)

    def base64_row(self, i: int) -> bytes:
        return self.b64[self.offsets[i] : self.offsets[i + 1]]


class Runner:
    def __init__(self, model: LoadedModel, pool_backend: str = "torch") -> None:
        self.model = model
        self.device = model.device
        self.pool_backend = pool_backend
        self._pool_encode = IMPLS[pool_backend]

    @torch.inference_mode()
    def run(
        self,
        inputs: Sequence[Sequence[int]],
        dims: Sequence[int],
        normalize: Sequence[bool],
        want_base64: Sequence[bool] | None = None,
    ) -> StepOutput:
        """Embed one packed step."""
        m = self.model
        dev = self.device
        B = len(inputs)
        lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int32)
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        input_ids = torch.tensor(list(itertools.chain.from_iterable(inputs)), dtype=torch.long)
        # Position within its own sequence for every packed token.
        positions = torch.arange(total, dtype=torch.long) - torch.repeat_interleave(
            cu_seqlens[:-1].long(), lengths.long()
        )
        max_seqlen = int(lengths.max())
        cu_dev = cu_seqlens.to(dev, non_blocking=True)
        dims_t = torch.tensor(dims, dtype=torch.int32, device=dev)
        norm_t = torch.tensor(normalize, dtype=torch.bool, device=dev)
        want_t = torch.tensor(want_base64 if want_base64 is not None else [False] * B, dtype=torch.bool, device=dev)

        hidden = m.encoder(input_ids.to(dev), positions.to(dev), cu_dev, max_seqlen)  # [T, H]
        if len(m.dense):
            H = hidden.shape[1]
            no = torch.zeros(B, dtype=torch.bool, device=dev)
            pooled, _, _ = self._pool_encode(hidden, cu_dev, m.spec.pooling, torch.full_like(dims_t, H), no, no)
            x = pooled.to(m.dtype)
            for layer in m.dense:
                x = layer(x)  # [B, D]
            hidden, cu_dev, mode = x, torch.arange(B + 1, dtype=torch.int32, device=dev), "cls"
        else:
            mode = m.spec.pooling
        vectors, b64, offsets = self._pool_encode(hidden, cu_dev, mode, dims_t, norm_t, want_t)
        return StepOutput(vectors.cpu(), b64.cpu().numpy().tobytes(), offsets.cpu().tolist())

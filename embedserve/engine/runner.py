"""The runner owns the model and its device: one step of packed inputs in, finished vectors out.

Only the engine thread calls :meth:`Runner.run`.
"""

from __future__ import annotations

import itertools
import logging
from typing import Sequence

import torch

from embedserve.kernels.pooling import finish, pool
from embedserve.models.sentence import LoadedModel

log = logging.getLogger(__name__)


class Runner:
    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def run(
        self, inputs: Sequence[Sequence[int]], dims: Sequence[int], normalize: Sequence[bool]
    ) -> torch.Tensor:
        """Embed one packed step. Returns ``[B, D]`` float32 on the CPU; row i is final up to ``dims[i]``."""
        m = self.model
        dev = self.device
        lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int32)
        cu_seqlens = torch.zeros(len(inputs) + 1, dtype=torch.int32)
        torch.cumsum(lengths, 0, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        input_ids = torch.tensor(list(itertools.chain.from_iterable(inputs)), dtype=torch.long)
        # Position within its own sequence for every packed token.
        positions = torch.arange(total, dtype=torch.long) - torch.repeat_interleave(
            cu_seqlens[:-1].long(), lengths.long()
        )
        max_seqlen = int(lengths.max())
        cu_dev = cu_seqlens.to(dev, non_blocking=True)

        hidden = m.encoder(input_ids.to(dev), positions.to(dev), cu_dev, max_seqlen)  # [T, H]
        vectors = pool(hidden, cu_dev, m.spec.pooling)  # [B, H] fp32
        if len(m.dense):
            x = vectors.to(m.dtype)
            for layer in m.dense:
                x = layer(x)
            vectors = x.float()  # [B, D]
        out = finish(
            vectors,
            torch.tensor(dims, dtype=torch.long, device=dev),
            torch.tensor(normalize, dtype=torch.bool, device=dev),
        )
        return out.cpu()

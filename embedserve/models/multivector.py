"""Multi-vector (late-interaction) outputs: one small vector per token.

bge-m3's ``colbert_linear`` (``[C, H]`` weight and ``[C]`` bias beside the encoder, published as
``colbert_linear.pt``; read by :func:`embedserve.models.lexical.read_linear`): every token's final state through it,
then L2-normalised; an input's vectors are those of its tokens after the first (the CLS token's is never used),
its end token's included (FlagEmbedding's ``BGEM3FlagModel`` rules).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from embedserve.kernels.linear import linear
from embedserve.models.lexical import read_linear

COLBERT_STEM = "colbert_linear"


class TokenVectors(nn.Module):
    """``[T, H]`` final states -> ``[T, C]`` per-token vectors (then L2-normalised, each)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, skip_first: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.skip_first = skip_first  # leading tokens of each input that have no vector (bge-m3: its CLS)

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vectors before normalisation (the runner normalises them with the pool+encode kernel)."""
        return linear(hidden, self.weight, self.bias)


def load_colbert(folder: Path, hidden: int, dtype: torch.dtype, device: torch.device) -> TokenVectors | None:
    state = read_linear(folder, COLBERT_STEM, hidden)
    if state is None:
        return None
    return TokenVectors(state["weight"].to(device=device, dtype=dtype), state["bias"].to(device=device, dtype=dtype))


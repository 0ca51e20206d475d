"""bge-m3's lexical weights (FlagEmbedding's sparse output), from the same final hidden states as its dense vector.

The folder carries a ``sparse_linear`` layer (``[1, H]`` weight and ``[1]`` bias) beside the encoder: the published
repository ships it as ``sparse_linear.pt``, a ``torch.save`` of its state dict. Each token's weight is
``relu(sparse_linear(h))``; the tokenizer's CLS, EOS, padding and unknown tokens are dropped; a token id that occurs
more than once keeps its largest weight; zero weights are left out; nothing is normalised (``BGEM3FlagModel``'s
rules). The same reader serves the ``colbert_linear`` layer the folder ships beside it.

Weights are read from ``<stem>.safetensors`` when the folder has one, else from ``<stem>.pt`` with
``torch.load(weights_only=True)`` (tensors only, never arbitrary objects), and either way only a state dict of
exactly ``weight`` and ``bias`` of the expected shapes is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from embedserve.errors import ModelLoadError

LEXICAL_STEM = "sparse_linear"


def read_linear(folder: Path, stem: str, in_features: int, out_features: int | None = None
                ) -> dict[str, torch.Tensor] | None:
    """A linear layer's ``{"weight", "bias"}`` saved beside the model as ``stem`` (.safetensors or .pt), checked
    against ``in_features`` (and ``out_features`` when given); None if the folder has neither file."""
    st_path, pt_path = folder / f"{stem}.safetensors", folder / f"{stem}.pt"
    try:
        if st_path.is_file():
            from safetensors.torch import load_file

            path, state = st_path, load_file(str(st_path), device="cpu")
        elif pt_path.is_file():
            path, state = pt_path, torch.load(pt_path, map_location="cpu", weights_only=True)
        else:
            return None
    except Exception as e:  # a corrupt file, or a pickle of something other than tensors
        raise ModelLoadError(f"{folder}: cannot read {stem} ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or set(state) != {"weight", "bias"} or not all(
            isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelLoadError(f"{path}: expected a linear layer's state dict of 'weight' and 'bias' tensors, got "
                             f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    weight, bias = state["weight"], state["bias"]
    out = out_features if out_features is not None else weight.shape[0]
    if tuple(weight.shape) != (out, in_features) or tuple(bias.shape) != (out,):
        raise ModelLoadError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not make a "
                             f"linear layer from the model's {in_features} hidden features to {out}")
    return state


class LexicalHead(nn.Module):
    """``[T, H]`` final states and their ``[T]`` token ids -> ``[T]`` float32 weights, 0 for the dropped tokens."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.reshape(-1), requires_grad=False)  # [H]
        self.bias = nn.Parameter(bias.reshape(()), requires_grad=False)
        self.register_buffer("dropped", torch.empty(0, dtype=torch.long), persistent=False)

    def drop(self, ids: Sequence[int]) -> None:
        """The token ids whose weight is always 0 (the tokenizer's CLS, EOS, padding and unknown tokens)."""
        self.dropped = torch.tensor(sorted(set(ids)), dtype=torch.long, device=self.weight.device)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        w = torch.relu(hidden.float() @ self.weight.float() + self.bias.float())
        if self.dropped.numel():
            w = w.masked_fill(torch.isin(ids, self.dropped.to(ids.dtype)), 0.0)
        return w


def load_lexical(folder: Path, hidden: int, dtype: torch.dtype, device: torch.device) -> LexicalHead | None:
    state = read_linear(folder, LEXICAL_STEM, hidden, 1)
    if state is None:
        return None
    return LexicalHead(state["weight"].to(device=device, dtype=dtype), state["bias"].to(device=device, dtype=dtype))


def lexical_rows(ids: Sequence[Sequence[int]], weights: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per input (its token ids, back to back with the others' in ``weights [T]``): its token ids ascending, each
    once with its largest weight, zero weights left out."""
    lengths = torch.tensor([len(x) for x in ids], dtype=torch.long)
    flat = torch.tensor([t for x in ids for t in x], dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    keep = weights > 0
    span = int(flat.max()) + 1 if flat.numel() else 1
    keys, where = torch.unique(row[keep] * span + flat[keep], return_inverse=True)  # sorted: by input, then id
    best = torch.zeros(keys.numel(), dtype=torch.float32).scatter_reduce_(0, where, weights[keep], reduce="amax")
    counts = torch.bincount(keys // span, minlength=len(ids)).tolist()
    return [(k % span, w) for k, w in zip(keys.split(counts), best.split(counts))]

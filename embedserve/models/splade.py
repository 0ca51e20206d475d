"""SPLADE models as sentence-transformers 5+ writes them (``SparseEncoder`` folders: ``MLMTransformer`` then
``SpladePooling``): a BERT-family encoder, its masked-LM head over every token's final state, and the pooling of
``log1p(relu(logits))`` over each sequence (:mod:`embedserve.kernels.sparse`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.linear import activate, linear
from embedserve.kernels.sparse import ACTIVATIONS, MODES
from embedserve.models.layers import activation
from embedserve.models.loader import read_json


@dataclass(frozen=True)
class SpladeSpec:
    mode: str  # max or sum over a sequence's tokens
    activation: str  # relu, or log1p_relu (log1p once more)


def read_splade_pooling(folder: Path) -> SpladeSpec:
    path = folder / "config.json"
    cfg = read_json(path) if path.is_file() else {}
    spec = SpladeSpec(cfg.get("pooling_strategy", "max"), cfg.get("activation_function", "relu"))
    if spec.mode not in MODES or spec.activation not in ACTIVATIONS:
        raise ModelLoadError(f"{path}: SpladePooling {spec.mode!r} / {spec.activation!r} is not supported; supported: "
                             f"pooling {', '.join(MODES)}, activation {', '.join(ACTIVATIONS)}")
    return spec


class MlmHead(nn.Module):
    """BERT's masked-LM head: dense -> activation -> LayerNorm -> the vocabulary's rows (the input embeddings',
    when tied) + a bias: ``[n, H]`` states -> ``[n, V]`` float32 logits."""

    def __init__(self, hidden: int, vocab: int, cfg: dict, *, untied: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.act = activation(cfg.get("hidden_act", "gelu"))
        self.norm = nn.LayerNorm(hidden, eps=cfg.get("layer_norm_eps", 1e-12))
        self.bias = nn.Parameter(torch.empty(vocab), requires_grad=False)
        self.decoder = nn.Parameter(torch.empty(vocab, hidden), requires_grad=False) if untied else None
        self.tied: torch.Tensor | None = None  # the encoder's word embeddings, set once they are loaded

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(activate(linear(hidden, self.dense.weight, self.dense.bias), self.act))
        rows = self.decoder if self.decoder is not None else self.tied
        return linear(x, rows, self.bias).float()

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        base = {f"{ours}.{p}": (f"cls.predictions.transform.{theirs}.{p}",)
                for ours, theirs in (("dense", "dense"), ("norm", "LayerNorm")) for p in ("weight", "bias")}
        maps = []
        # transformers' forward adds the decoder's own bias; older checkpoints keep only the tied cls.predictions.bias
        for bias in ("cls.predictions.decoder.bias", "cls.predictions.bias"):
            m = dict(base, bias=(bias,))
            if self.decoder is not None:
                m["decoder"] = ("cls.predictions.decoder.weight",)
            maps.append(m)
        return maps


@dataclass
class SparseHead:
    """What turns a SPLADE model's final states into its sparse vectors."""

    head: MlmHead
    spec: SpladeSpec

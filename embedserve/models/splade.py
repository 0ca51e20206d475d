"""SPLADE models as sentence-transformers 5+ writes them (``SparseEncoder`` folders: ``MLMTransformer`` then
``SpladePooling``): a BERT-family encoder, its masked-LM head over every token's final state, and the pooling of
``log1p(relu(logits))`` over each sequence (:mod:`embedserve.kernels.sparse`).

An inference-free folder (OpenSearch's ``doc`` models) is a ``Router``: its document side is that encoder, its query
side a ``SparseStaticEmbedding``, one weight per vocabulary token: a query's vector is the weight of each token it
holds (tokenized without special tokens), with no forward pass at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.linear import activate, linear
from embedserve.kernels.sparse import ACTIVATIONS, MODES
from embedserve.models.layers import activation
from embedserve.models.loader import inside, read_json


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


@dataclass(frozen=True)
class RouterSides:
    """A sentence-transformers ``Router`` folder served as inference-free SPLADE: the document side's Transformer
    folder and SpladePooling, and the query side's SparseStaticEmbedding folder (None: queries run as documents)."""

    transformer: Path
    splade: SpladeSpec
    static_query: Path | None


def read_router(directory: Path) -> RouterSides:
    path = directory / "router_config.json"
    cfg = read_json(path)
    types = {name: str(kind).rsplit(".", 1)[-1] for name, kind in (cfg.get("types") or {}).items()}
    routes = cfg.get("structure") or {}
    default = (cfg.get("parameters") or {}).get("default_route") or "document"
    document, query = routes.get("document", routes.get(default)), routes.get("query")
    kinds = [types.get(name) for name in document or ()]
    if len(kinds) != 2 or kinds[0] not in ("Transformer", "MLMTransformer") or kinds[1] != "SpladePooling":
        raise ModelLoadError(f"{path}: a Router is served as inference-free SPLADE only (a document side of "
                             f"MLMTransformer and SpladePooling); its document side is {kinds}")
    static = None
    if query is not None and query != document:
        if [types.get(name) for name in query] != ["SparseStaticEmbedding"]:
            raise ModelLoadError(f"{path}: the query side must be the document's modules or one "
                                 f"SparseStaticEmbedding; it is {[types.get(name) for name in query]}")
        static = inside(directory, query[0], path.name)
    return RouterSides(inside(directory, document[0], path.name),
                       read_splade_pooling(inside(directory, document[1], path.name)), static)


def load_static_query(folder: Path) -> torch.Tensor:
    """A SparseStaticEmbedding's ``[V]`` float32 weights (its ``model.safetensors``, as sentence-transformers
    saves it)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: a SparseStaticEmbedding without model.safetensors is not supported")
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # a corrupt or truncated file
        raise ModelLoadError(f"cannot read {path}: {e}") from e
    weight = state.get("weight")
    if weight is None or weight.dim() != 1:
        raise ModelLoadError(f"{path}: expected one 'weight' vector, one value per token; it holds "
                             f"{ {k: tuple(v.shape) for k, v in state.items()} }")
    return weight.float()


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
    query: torch.Tensor | None = None  # an inference-free folder: each token's query weight, [V] on the host

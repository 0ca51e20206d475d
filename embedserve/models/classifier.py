"""Sequence-classification heads (cross-encoder rerankers and text classifiers) over packed hidden states.

A ``*ForSequenceClassification`` checkpoint is an encoder this package already serves plus a small head that
turns each sequence into ``num_labels`` logits:

- BERT (ms-marco-MiniLM cross-encoders): the pooler (dense + tanh on the first token), then ``classifier``;
- RoBERTa / XLM-RoBERTa (bge-reranker-base / large / v2-m3): ``classifier.dense`` + tanh on the first token,
  then ``classifier.out_proj``;
- ModernBERT (gte-reranker-modernbert-base): the first token or the mean (``classifier_pooling``), then
  ``head.dense`` -> activation -> ``head.norm``, then ``classifier``.

Logits leave in float32; the activation the folder declares (sentence-transformers' ``activation_fn``: sigmoid
for one label unless it says otherwise) is applied by the engine, so that a request may ask for raw scores.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.linear import activate, linear
from embedserve.kernels.pooling import pool
from embedserve.models.layers import activation

# sentence-transformers activation_fn (a torch.nn class path) -> ours
ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh", "Softmax": "softmax"}


@dataclass(frozen=True)
class PairTemplate:
    """How a causal-LM reranker sees a pair: ``prefix`` + ``middle.format(query=, document=)`` + ``suffix``, each
    part tokenized on its own (prefix and suffix without special tokens); only the middle is ever cut."""

    prefix: str
    middle: str
    suffix: str


# The Qwen3-Reranker model card's prompt, with its default instruction.
QWEN3_RERANKER = PairTemplate(
    prefix='<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct '
           'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n',
    middle="<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
           "<Query>: {query}\n<Document>: {document}",
    suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
)


@dataclass(frozen=True)
class ClassifierSpec:
    labels: tuple[str, ...]  # id2label, in label order
    activation: str  # one of ACTIVATIONS' values
    template: PairTemplate | None = None  # causal-LM rerankers: the prompt around each pair

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def read_classifier_spec(directory: Path, cfg: dict) -> ClassifierSpec:
    """Labels from ``config.json``; the activation from sentence-transformers' config (v4+ and v6 spellings,
    and the v3 ``sbert_ce_default_activation_function``), else sigmoid for one label and identity for more."""
    id2label = cfg.get("id2label") or {}
    num = int(cfg.get("num_labels") or len(id2label) or 1)
    labels = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num))
    path = None
    st_path = directory / "config_sentence_transformers.json"
    if st_path.is_file():
        try:
            path = json.loads(st_path.read_text()).get("activation_fn")
        except ValueError as e:
            raise ModelLoadError(f"{st_path} is not valid JSON: {e}") from None
    path = path or (cfg.get("sentence_transformers") or {}).get("activation_fn")
    path = path or cfg.get("sbert_ce_default_activation_function")
    if path is None:
        act = "sigmoid" if num == 1 else "identity"
    else:
        name = str(path).rsplit(".", 1)[-1]
        if not str(path).startswith("torch.") or name not in ACTIVATIONS:
            raise ModelLoadError(f"{directory}: activation_fn {path!r} is not supported; supported: "
                                 + ", ".join(f"torch.nn.{n}" for n in ACTIVATIONS))
        act = ACTIVATIONS[name]
    return ClassifierSpec(labels, act)


def apply_activation(logits: torch.Tensor, name: str) -> torch.Tensor:
    """``[N, L]`` float32 logits -> scores as sentence-transformers' CrossEncoder.predict gives them."""
    if name == "sigmoid":
        return torch.sigmoid(logits)
    if name == "tanh":
        return torch.tanh(logits)
    if name == "softmax":
        return torch.softmax(logits, dim=-1)
    return logits


def _first_tokens(hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    return hidden.index_select(0, cu[:-1].long())  # [B, H]


class BertHead(nn.Module):
    """BERT's pooler then a linear classifier."""

    def __init__(self, hidden: int, num_labels: int, cfg: dict) -> None:
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(linear(_first_tokens(hidden, cu), self.pooler.weight, self.pooler.bias))
        return linear(x, self.classifier.weight, self.classifier.bias).float()

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        maps = []
        for base in ("bert.", ""):
            m = {f"pooler.{p}": (f"{base}pooler.dense.{p}",) for p in ("weight", "bias")}
            m.update({f"classifier.{p}": (f"classifier.{p}",) for p in ("weight", "bias")})
            maps.append(m)
        return maps


class RobertaHead(nn.Module):
    """RoBERTa's classification head: dense + tanh on the first token, then the output projection."""

    def __init__(self, hidden: int, num_labels: int, cfg: dict) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(linear(_first_tokens(hidden, cu), self.dense.weight, self.dense.bias))
        return linear(x, self.out_proj.weight, self.out_proj.bias).float()

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        return [{f"{n}.{p}": (f"classifier.{n}.{p}",) for n in ("dense", "out_proj") for p in ("weight", "bias")}]


class ModernBertHead(nn.Module):
    """ModernBERT's: CLS or mean pooling, dense -> activation -> LayerNorm, then the classifier."""

    def __init__(self, hidden: int, num_labels: int, cfg: dict) -> None:
        super().__init__()
        self.pooling = cfg.get("classifier_pooling", "cls")
        if self.pooling not in ("cls", "mean"):
            raise ModelLoadError(f"classifier_pooling {self.pooling!r} is not supported; supported: cls, mean")
        self.dense_bias = bool(cfg.get("classifier_bias", False))
        self.norm_bias = bool(cfg.get("norm_bias", False))
        self.dense = nn.Linear(hidden, hidden, bias=self.dense_bias)
        self.act = activation(cfg.get("classifier_activation", "gelu"))
        self.norm = nn.LayerNorm(hidden, eps=cfg.get("norm_eps", 1e-5), bias=self.norm_bias)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        x = _first_tokens(hidden, cu) if self.pooling == "cls" else pool(hidden, cu, "mean").to(hidden.dtype)
        x = self.norm(activate(linear(x, self.dense.weight, self.dense.bias), self.act))
        return linear(x, self.classifier.weight, self.classifier.bias).float()

    def weight_maps(self) -> list[dict[str, tuple[str, ...]]]:
        m = {"dense.weight": ("head.dense.weight",), "norm.weight": ("head.norm.weight",),
             "classifier.weight": ("classifier.weight",), "classifier.bias": ("classifier.bias",)}
        if self.dense_bias:
            m["dense.bias"] = ("head.dense.bias",)
        if self.norm_bias:
            m["norm.bias"] = ("head.norm.bias",)
        return [m]


class YesNoHead(nn.Module):
    """A causal LM as a reranker: the last token's logit for "yes" minus its logit for "no" (the log-odds whose
    sigmoid is the model card's softmax over the two). Only those two rows of the LM head are kept."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = nn.Parameter(rows, requires_grad=False)  # [2, H]: no, yes

    def forward(self, hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        last = hidden.index_select(0, (cu[1:] - 1).long())  # [B, H]
        logits = linear(last, self.rows, None).float()  # [B, 2]
        return logits[:, 1:2] - logits[:, 0:1]


def head_tensor_names(head: nn.Module, checkpoint_names: set[str]) -> tuple[str, ...]:
    """Regexes for the checkpoint tensors ``head`` loads, so the encoder's strict load may pass over them."""
    names = {n for m in head.weight_maps() for sources in m.values() for n in sources}
    return tuple(re.escape(n) for n in sorted(names & checkpoint_names))

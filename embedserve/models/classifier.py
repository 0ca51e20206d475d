"""Sequence-classification heads (cross-encoder rerankers and text classifiers) over packed hidden states.

A ``*ForSequenceClassification`` checkpoint is an encoder this package already serves plus a small head that
turns each sequence into ``num_labels`` logits:

- BERT (ms-marco-MiniLM cross-encoders): the pooler (dense + tanh on the first token), then ``classifier``;
- RoBERTa / XLM-RoBERTa (bge-reranker-base / large / v2-m3): ``classifier.dense`` + tanh on the first token,
  then ``classifier.out_proj``;
- ModernBERT (gte-reranker-modernbert-base): the first token or the mean (``classifier_pooling``), then
  ``head.dense`` -> activation -> ``head.norm``, then ``classifier``.

Causal LMs score by their last token's LM-head logits for a "true" (and a "false") token: Qwen3-Reranker by
its model card's prompt (``--kind rerank``), and sentence-transformers 6 CrossEncoder folders (Transformer +
``LogitScore``) by the folder's chat template (:class:`ChatTemplate`).

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
from embedserve.models.loader import inside, read_json

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
class ChatTemplate:
    """How a sentence-transformers 6 causal-LM CrossEncoder (Transformer + LogitScore) sees a pair: the
    tokenizer's chat template renders ``[{"role": "query"}, {"role": "document"}]``, after a system message that
    holds the folder's default prompt if it names one; the render is tokenized without special tokens and cut
    at the right, and a cut pair gets the template's tail written back over its last tokens."""

    kwargs: tuple[tuple[str, object], ...] = ()  # apply_chat_template's keyword arguments from processing_kwargs
    system: str | None = None  # the default prompt, as a system message
    restore_suffix: bool = True


@dataclass(frozen=True)
class ClassifierSpec:
    labels: tuple[str, ...]  # id2label, in label order
    activation: str  # one of ACTIVATIONS' values
    template: PairTemplate | ChatTemplate | None = None  # causal-LM rerankers: how each pair is formatted

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


def read_logit_score(directory: Path) -> tuple[tuple[int, ...], ChatTemplate | None] | None:
    """A sentence-transformers 6 CrossEncoder folder of a causal LM (``modules.json``: a Transformer in this
    folder, then a ``LogitScore``): the token ids it scores by (true, and false if it has one) and how a pair is
    formatted (the chat template, or None where the folder feeds text pairs as they are). None for any other
    folder."""
    modules_path = directory / "modules.json"
    if not modules_path.is_file():
        return None
    modules = read_json(modules_path)
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if "LogitScore" not in types:
        return None
    if types != ["Transformer", "LogitScore"] or modules[0].get("path", "") not in ("", "."):
        raise ModelLoadError(f"{modules_path}: a LogitScore reranker is served as a Transformer in this folder "
                             f"followed by a LogitScore; this one has {types}")
    score_cfg = read_json(inside(directory, modules[1].get("path", ""), modules_path.name) / "config.json")
    if score_cfg.get("module_input_name", "causal_logits") != "causal_logits":
        raise ModelLoadError(f"{directory}: LogitScore reads {score_cfg['module_input_name']!r}; only the causal "
                             "LM's logits (causal_logits) are supported")
    ids = tuple(score_cfg.get(k) for k in ("true_token_id", "false_token_id") if score_cfg.get(k) is not None)
    if not ids or "true_token_id" not in score_cfg or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ModelLoadError(f"{directory}: LogitScore needs a true_token_id (and optionally a false_token_id), "
                             f"got {score_cfg}")
    bert_path = directory / "sentence_bert_config.json"
    bert = read_json(bert_path) if bert_path.is_file() else {}
    if bert.get("transformer_task", "text-generation") != "text-generation":
        raise ModelLoadError(f"{bert_path}: a LogitScore reranker's Transformer must be a text-generation one, "
                             f"not {bert['transformer_task']!r}")
    processing = dict(bert.get("processing_kwargs") or {})
    chat_kwargs = dict(processing.pop("chat_template", None) or {})
    restore = bool(chat_kwargs.pop("restore_suffix", True))
    unsupported = sorted(processing) + sorted(k for k in chat_kwargs if k in _TOKENIZER_SIZE_KEYS)
    if unsupported:
        raise ModelLoadError(f"{bert_path}: processing_kwargs {', '.join(unsupported)} are not supported (the "
                             "maximum length comes from max_seq_length or the tokenizer)")
    st_path = directory / "config_sentence_transformers.json"
    st_cfg = read_json(st_path) if st_path.is_file() else {}
    default = st_cfg.get("default_prompt_name")
    system = (st_cfg.get("prompts") or {}).get(default) if default else None
    if "message" not in (bert.get("modality_config") or {}):
        if system:
            raise ModelLoadError(f"{st_path}: a default prompt on a reranker fed plain text pairs is not supported")
        return ids, None
    fmt = bert["modality_config"]["message"].get("format", "flat")
    if fmt != "flat":
        raise ModelLoadError(f"{bert_path}: message format {fmt!r} is not supported; only 'flat' (text content)")
    return ids, ChatTemplate(tuple(sorted(chat_kwargs.items())), system or None, restore)


# apply_chat_template's tokenizing arguments: a folder that sets them in its chat-template kwargs is refused.
_TOKENIZER_SIZE_KEYS = frozenset({"max_length", "truncation", "padding", "return_tensors", "pad_to_multiple_of"})


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


class TokenLogitHead(nn.Module):
    """A causal LM as a reranker: the last token's logit for a "true" token (``yes``), minus the logit for a
    "false" token (``no``) when there is one: the log-odds whose sigmoid is Qwen3-Reranker's softmax over the
    two, and sentence-transformers' ``LogitScore``. Only those LM-head rows are kept."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        if rows.shape[0] not in (1, 2):
            raise ValueError(f"a true token's row and at most one false token's, got {rows.shape[0]} rows")
        self.rows = nn.Parameter(rows, requires_grad=False)  # [1 or 2, H]: true[, false]

    def forward(self, hidden: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
        last = hidden.index_select(0, (cu[1:] - 1).long())  # [B, H]
        logits = linear(last, self.rows, None).float()  # [B, 1 or 2]
        return logits[:, 0:1] - logits[:, 1:2] if logits.shape[1] == 2 else logits


def head_tensor_names(head: nn.Module, checkpoint_names: set[str]) -> tuple[str, ...]:
    """Regexes for the checkpoint tensors ``head`` loads, so the encoder's strict load may pass over them."""
    names = {n for m in head.weight_maps() for sources in m.values() for n in sources}
    return tuple(re.escape(n) for n in sorted(names & checkpoint_names))

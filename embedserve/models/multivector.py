"""Multi-vector (late-interaction) outputs: one small vector per token.

Two kinds of folder give them:

- bge-m3's ``colbert_linear`` (``[C, H]`` weight and ``[C]`` bias beside the encoder, published as
  ``colbert_linear.pt``; read by :func:`embedserve.models.lexical.read_linear`): every token's final state through
  it, then L2-normalised; an input's vectors are those of its tokens after the first (the CLS token's is never
  used), its end token's included (FlagEmbedding's ``BGEM3FlagModel`` rules).
- A PyLate ColBERT folder: the sentence-transformers layout with a ``Transformer`` then one or more (PyLate)
  ``Dense`` modules applied to every token, and no pooling; ``config_sentence_transformers.json`` holds PyLate's
  settings (:class:`PylateSpec`). Every token's vector, L2-normalised; a query is its prefix token after the first
  token, then its text's tokens, padded with [MASK] to ``query_length`` (query expansion); a document keeps every
  token but those of the skiplist.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.linear import linear
from embedserve.models.lexical import read_linear

COLBERT_STEM = "colbert_linear"


@dataclass(frozen=True)
class PylateSpec:
    """PyLate's ColBERT settings, with PyLate's defaults for the ones a folder leaves out."""

    query_prefix: str = "[Q] "
    document_prefix: str = "[D] "
    query_length: int = 32  # a query's tokens, its prefix token included; shorter ones are padded when expanded
    document_length: int = 180
    do_query_expansion: bool = True  # queries padded with [MASK] to query_length, every slot a vector
    attend_to_expansion_tokens: bool = False  # whether the text's tokens see the [MASK] padding
    skiplist_words: tuple[str, ...] = tuple(string.punctuation)  # a document's tokens that get no vector

    @property
    def hidden_expansion(self) -> bool:
        """Query expansion tokens that read the text but that nothing reads (ColBERT's default)."""
        return self.do_query_expansion and not self.attend_to_expansion_tokens


def read_pylate(st_cfg: dict, path: Path) -> PylateSpec:
    """:class:`PylateSpec` from a folder's ``config_sentence_transformers.json`` (already read)."""
    defaults, values = PylateSpec(), {}
    for name in PylateSpec.__dataclass_fields__:
        default = getattr(defaults, name)
        value = st_cfg.get(name)
        if value is None:
            continue
        if name == "skiplist_words":
            if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
                raise ModelLoadError(f"{path}: skiplist_words must be a list of strings")
            value = tuple(value)
        elif not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
            raise ModelLoadError(f"{path}: {name} must be a {type(default).__name__}, got {value!r}")
        values[name] = value
    spec = PylateSpec(**values)
    if spec.query_length < 2 or spec.document_length < 3:
        raise ModelLoadError(f"{path}: query_length {spec.query_length} and document_length {spec.document_length} "
                             "leave no room for a text beside the special and prefix tokens")
    return spec


@dataclass(frozen=True)
class PylateTokens:
    """A PyLate folder's settings as token ids of its tokenizer (PyLate's lookups, unknown words included)."""

    query_prefix: int | None  # inserted after a query's first token; None: no prefix
    document_prefix: int | None
    expansion: int  # what a query is padded with: [MASK] (else the end-of-sequence token, else padding)
    skiplist: frozenset[int]  # a document's tokens that get no vector


def pylate_tokens(directory: Path, spec: PylateSpec) -> PylateTokens:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    ids = {}
    for side, prefix in (("query", spec.query_prefix), ("document", spec.document_prefix)):
        found = tok.convert_tokens_to_ids(prefix) if prefix else None
        if prefix and (found is None or found == tok.unk_token_id):
            raise ModelLoadError(f"{directory}: the {side} prefix {prefix!r} is not a token of the tokenizer (PyLate "
                                 "adds it when it saves the model)")
        ids[side] = found
    expansion = next((i for i in (tok.mask_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None), None)
    if expansion is None:
        raise ModelLoadError(f"{directory}: the tokenizer has no [MASK], end or padding token to expand queries with")
    skiplist = frozenset(i for i in tok.convert_tokens_to_ids(list(spec.skiplist_words)) if i is not None)
    return PylateTokens(ids["query"], ids["document"], expansion, skiplist)


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class TokenVectors(nn.Module):
    """``[T, H]`` final states -> ``[T, C]`` per-token vectors (then L2-normalised, each). ``project``: bge-m3's
    ``colbert_linear``, or a PyLate folder's Dense layers; ``skip_first``: leading tokens of each input that get
    no vector (bge-m3: its CLS); ``pylate``: a PyLate folder's settings (the model's only output), with
    ``tokens``, the same as token ids."""

    def __init__(self, project: nn.Module, width: int, *, skip_first: int = 1, pylate: PylateSpec | None = None,
                 tokens: PylateTokens | None = None) -> None:
        super().__init__()
        self.project = project
        self.width = width
        self.skip_first = skip_first
        self.pylate = pylate
        self.tokens = tokens

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vectors before normalisation (the runner normalises them with the pool+encode kernel)."""
        return self.project(hidden)


def load_colbert(folder: Path, hidden: int, dtype: torch.dtype, device: torch.device) -> TokenVectors | None:
    state = read_linear(folder, COLBERT_STEM, hidden)
    if state is None:
        return None
    weight = state["weight"].to(device=device, dtype=dtype)
    return TokenVectors(_Linear(weight, state["bias"].to(device=device, dtype=dtype)), weight.shape[0])


def maxsim(query: torch.Tensor, documents: list[torch.Tensor]) -> torch.Tensor:
    """ColBERT's late-interaction score of each document for one query: over the query's vectors ``[q, C]``, the
    sum of each one's largest dot product with the document's vectors ``[d, C]``. ``[len(documents)]`` float32."""
    if not documents:
        return torch.empty(0)
    sizes = [d.shape[0] for d in documents]
    sims = query.float() @ torch.cat(documents).float().T  # [q, sum d]
    return torch.stack([part.amax(dim=1).sum() for part in sims.split(sizes, dim=1)])

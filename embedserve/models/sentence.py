"""A model directory in the Hugging Face / sentence-transformers layout, loaded for serving.

Reads ``config.json``, the safetensors weights, ``modules.json`` (Transformer -> Pooling -> [Dense ...] ->
[Normalize]), ``1_Pooling/config.json``, ``2_Dense/*``, ``sentence_bert_config.json`` and
``config_sentence_transformers.json``. A plain transformers directory without ``modules.json`` is served with
mean pooling and no normalisation (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from embedserve.errors import ModelLoadError
from embedserve.kernels.attention import AttentionShape
from embedserve.kernels.pooling import POOLING_MODES
from embedserve.models import registry
from embedserve.kernels.linear import linear
from embedserve.models.layers import activation
from embedserve.models.classifier import (
    QWEN3_RERANKER,
    ClassifierSpec,
    TokenLogitHead,
    head_tensor_names,
    read_classifier_spec,
    read_logit_score,
)
from embedserve.models.encoder import Kernels
from embedserve.models.lexical import LexicalHead, load_lexical
from embedserve.models.multivector import PylateSpec, TokenVectors, load_colbert, pylate_tokens, read_pylate
from embedserve.models.loader import SafetensorsCheckpoint, inside, load_weights, read_json
from embedserve.models.splade import (
    MlmHead,
    SparseHead,
    SpladeSpec,
    load_static_query,
    read_router,
    read_splade_pooling,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# sentence-transformers Pooling flags -> our mode names
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last", "last": "last"}
_UNSUPPORTED_POOLING = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")

_ST_ACTIVATIONS = {
    "Tanh": "tanh",
    "Identity": "identity",
    "ReLU": "relu",
    "GELU": "gelu",
    "SiLU": "silu",
}


@dataclass(frozen=True, kw_only=True)
class SentenceSpec:
    """What the sentence-transformers modules say about turning hidden states into the embedding."""

    pooling: str = "mean"
    normalize: bool = False
    dense: tuple[Path, ...] = ()
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    splade: SpladeSpec | None = None  # a SparseEncoder folder: SPLADE pooling over the masked-LM logits
    transformer: Path | None = None  # a Router folder: where its document side's Transformer is
    static_query: Path | None = None  # a Router folder: its query side's SparseStaticEmbedding
    pylate: PylateSpec | None = None  # a PyLate ColBERT folder: its Dense layers (``dense``) run on every token


def _pooling_mode(cfg: dict, path: Path) -> str:
    if isinstance(cfg.get("pooling_mode"), str):
        name = cfg["pooling_mode"]
        if name not in _POOLING_NAMES:
            raise ModelLoadError(f"{path}: pooling mode {name!r} is not supported; supported: {', '.join(POOLING_MODES)}")
        return _POOLING_NAMES[name]
    unsupported = [k for k in _UNSUPPORTED_POOLING if cfg.get(k)]
    chosen = [mode for flag, mode in _POOLING_FLAGS.items() if cfg.get(flag)]
    if unsupported or len(chosen) != 1:
        raise ModelLoadError(
            f"{path}: pooling {unsupported + chosen or 'none'} is not supported; exactly one of "
            f"{', '.join(POOLING_MODES)} (flags {', '.join(_POOLING_FLAGS)}) is"
        )
    if cfg.get("include_prompt", True) is False:
        raise ModelLoadError(f"{path}: include_prompt=false (pooling without the prompt) is not supported")
    return chosen[0]


def read_sentence_spec(directory: Path) -> SentenceSpec:
    modules_path = directory / "modules.json"
    st_cfg_path = directory / "config_sentence_transformers.json"
    router = _router_sides(directory)
    bert_cfg_path = (router.transformer if router else directory) / "sentence_bert_config.json"
    st_cfg = read_json(st_cfg_path) if st_cfg_path.is_file() else {}
    bert_cfg = read_json(bert_cfg_path) if bert_cfg_path.is_file() else {}
    common = dict(
        max_seq_length=bert_cfg.get("max_seq_length"),
        do_lower_case=bool(bert_cfg.get("do_lower_case", False)),
        prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name") or None,
    )
    if router is not None:
        return SentenceSpec(pooling="cls", splade=router.splade, transformer=router.transformer,
                            static_query=router.static_query, **common)
    if not modules_path.is_file():
        log.warning("%s has no modules.json: serving with mean pooling and no normalisation", directory)
        return SentenceSpec(**common)

    pooling: str | None = None
    normalize = False
    dense: list[Path] = []
    splade: SpladeSpec | None = None
    for module in read_json(modules_path):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "SpladePooling":
            splade = read_splade_pooling(inside(directory, module.get("path", ""), modules_path.name))
        elif kind in ("Transformer", "MLMTransformer"):
            if module.get("path", "") not in ("", "."):
                raise ModelLoadError(f"{modules_path}: a Transformer module outside the top folder is not supported")
        elif kind == "Pooling":
            sub = inside(directory, module.get("path", ""), modules_path.name)
            pooling = _pooling_mode(read_json(sub / "config.json"), sub / "config.json")
        elif kind == "Dense":
            if pooling is None and not _is_pylate(st_cfg):
                raise ModelLoadError(f"{modules_path}: a Dense module before Pooling is not supported")
            dense.append(inside(directory, module.get("path", ""), modules_path.name))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ModelLoadError(
                f"{modules_path}: module type {module.get('type')!r} is not supported; "
                "supported: Transformer, Pooling, Dense, Normalize; MLMTransformer and SpladePooling (SPLADE)"
            )
    if splade is not None:
        if pooling is not None or dense or normalize:
            raise ModelLoadError(f"{modules_path}: SpladePooling beside Pooling, Dense or Normalize is not supported")
        return SentenceSpec(pooling="cls", splade=splade, **common)
    if pooling is None and dense and _is_pylate(st_cfg):
        # A PyLate ColBERT folder: Transformer then Dense layers over every token, no pooling.
        if normalize:
            raise ModelLoadError(f"{modules_path}: a Normalize module in a PyLate folder is not supported")
        return SentenceSpec(pooling="cls", dense=tuple(dense), pylate=read_pylate(st_cfg, st_cfg_path), **common)
    if pooling is None:
        raise ModelLoadError(f"{modules_path} has no Pooling module")
    return SentenceSpec(pooling=pooling, normalize=normalize, dense=tuple(dense), **common)


def _is_pylate(st_cfg: dict) -> bool:
    """``config_sentence_transformers.json`` of a PyLate ColBERT folder: MaxSim, or PyLate's own settings."""
    return st_cfg.get("similarity_fn_name") == "MaxSim" or "query_prefix" in st_cfg or "query_length" in st_cfg


def _router_sides(directory: Path):
    """A folder whose only module is a sentence-transformers Router: its sides (:func:`read_router`)."""
    path = directory / "modules.json"
    modules = read_json(path) if path.is_file() else []
    if len(modules) == 1 and str(modules[0].get("type", "")).rsplit(".", 1)[-1] == "Router":
        return read_router(inside(directory, modules[0].get("path", ""), path.name))
    return None


def _cross_encoder_spec(directory: Path) -> SentenceSpec:
    """A CrossEncoder folder (or a plain transformers one): only the length limit and casing apply."""
    path = directory / "sentence_bert_config.json"
    cfg = read_json(path) if path.is_file() else {}
    return SentenceSpec(pooling="cls", max_seq_length=cfg.get("max_seq_length"),
                        do_lower_case=bool(cfg.get("do_lower_case", False)))


class Dense(nn.Module):
    """sentence-transformers ``Dense``: linear then activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool, act: str) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.linear.weight, self.linear.bias, self.act)


def _load_dense(folder: Path, dtype: torch.dtype, device: torch.device) -> Dense:
    cfg = read_json(folder / "config.json")
    act_name = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if act_name not in _ST_ACTIVATIONS:
        raise ModelLoadError(
            f"{folder}/config.json: activation {act_name!r} is not supported; supported: {', '.join(_ST_ACTIVATIONS)}"
        )
    bias = bool(cfg.get("bias", True))
    if cfg.get("use_residual"):
        raise ModelLoadError(f"{folder}/config.json: a Dense layer with use_residual is not supported")
    with torch.device("meta"):
        layer = Dense(cfg["in_features"], cfg["out_features"], bias, _ST_ACTIVATIONS[act_name])
    names = {"linear.weight": ("linear.weight",)}
    if bias:
        names["linear.bias"] = ("linear.bias",)
    load_weights(layer, SafetensorsCheckpoint(folder), names, dtype=dtype, device=device)
    return layer


def _dense_width(dense: nn.ModuleList, dims: int) -> int:
    """The width after the Dense layers, each checked to take what the one before gives."""
    for layer in dense:
        if layer.linear.in_features != dims:
            raise ModelLoadError(f"Dense layer expects {layer.linear.in_features} features but receives {dims}")
        dims = layer.linear.out_features
    return dims


def _check_pylate(recipe: ModelRecipe, encoder: nn.Module) -> None:
    """What a PyLate folder needs of its encoder: bidirectional attention and, when queries are expanded with
    [MASK] tokens the text does not attend to, attention that hides them (within every window)."""
    spec, directory = recipe.spec.pylate, recipe.directory
    if encoder.causal:
        raise ModelLoadError(f"{directory}: a PyLate folder on a causal model is not supported (BERT-family and "
                             "ModernBERT encoders are)")
    if spec.hidden_expansion:
        if not encoder.hidden_tails:
            raise ModelLoadError(f"{directory}: {type(encoder).__name__} cannot hide a query's expansion tokens "
                                 "(attend_to_expansion_tokens false); BERT-family and ModernBERT encoders can")
        window = getattr(recipe.args, "window", None)
        if window is not None and spec.query_length > window:
            raise ModelLoadError(f"{directory}: query_length {spec.query_length} is longer than the local "
                                 f"attention's reach ({window} tokens) with hidden expansion tokens")


@dataclass
class LoadedModel:
    """Everything the runner needs: the encoder, the head, and what the folder says about inputs."""

    directory: Path
    name: str
    encoder: nn.Module
    dense: nn.ModuleList
    spec: SentenceSpec
    dtype: torch.dtype
    device: torch.device
    hidden_size: int
    dimensions: int
    max_length: int  # the longest input embedded, in tokens, special tokens included
    hf_config: dict
    head: nn.Module | None = None  # a sequence-classification head: the model scores instead of embedding
    classifier: ClassifierSpec | None = None
    sparse: SparseHead | None = None  # a SPLADE model: vocabulary-wide sparse vectors
    lexical: LexicalHead | None = None  # bge-m3's lexical weights, beside its dense vector
    colbert: TokenVectors | None = None  # per-token vectors: bge-m3's (beside its dense vector), or a PyLate model's

    @property
    def kind(self) -> str:
        """``embedding``; ``sparse`` for SPLADE; ``multi_vector`` for a PyLate ColBERT model; ``rerank`` for a
        one-label cross-encoder; ``classify`` for a classifier of more labels."""
        if self.sparse is not None:
            return "sparse"
        if self.colbert is not None and self.colbert.pylate is not None:
            return "multi_vector"
        if self.classifier is None:
            return "embedding"
        return "rerank" if self.classifier.num_labels == 1 else "classify"

    @property
    def causal(self) -> bool:
        return bool(self.encoder.causal)


def _yes_no_ids(directory: Path) -> tuple[int, int]:
    """The tokenizer's "yes" and "no" tokens: what the model card's recipe scores by."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    ids = tuple(tok.convert_tokens_to_ids(t) for t in ("yes", "no"))
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ModelLoadError(f"{directory}: the tokenizer has no single 'yes' / 'no' tokens to score a reranker by")
    return ids


def _lm_head_rows(directory: Path, checkpoint: SafetensorsCheckpoint, prefixes: tuple[str, ...],
                  ids: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """``[len(ids), H]``: the LM head's rows for these tokens (the input embeddings' when the head is tied)."""
    names = checkpoint.names()
    for name in ["lm_head.weight"] + [p + "embed_tokens.weight" for p in prefixes]:
        if name in names:
            rows = checkpoint.shape(name)[0]
            if any(i >= rows for i in ids):
                raise ModelLoadError(f"{directory}: token ids {list(ids)} to score by, but {name} has {rows} rows")
            return checkpoint.read_rows(name, list(ids), dtype)
    raise ModelLoadError(f"{directory}: no lm_head.weight (nor tied embed_tokens) to score a reranker by")


@dataclass(frozen=True)
class ModelRecipe:
    """What a model folder says, read before any weight: its family and arguments, its sentence-transformers
    modules, and what it scores by. The engine chooses the kernels from it, then :func:`build_model` loads the
    weights into an encoder built with them."""

    directory: Path
    hf_config: dict
    args: Any  # the family's frozen arguments (max_length, hidden_size, attention_shape)
    encoder_cls: type  # an :class:`~embedserve.models.encoder.Encoder` family
    spec: SentenceSpec
    head_cls: type | None = None  # a sequence-classification checkpoint's head
    classifier: ClassifierSpec | None = None
    score_ids: Sequence[int] | None = None  # a causal LM scored by its last token's logits for these tokens

    @property
    def attention_shape(self) -> AttentionShape:
        return self.args.attention_shape

    @property
    def supports_chunking(self) -> bool:
        return self.encoder_cls.supports_chunking

    @property
    def max_length(self) -> int:
        """The longest input embedded, in tokens, special tokens included (the positions' and the folder's). A
        PyLate folder's are its query and document lengths (its saved max_seq_length is whichever it cut last)."""
        pylate = self.spec.pylate
        if pylate is not None:
            return min(self.args.max_length, max(pylate.query_length, pylate.document_length))
        if self.spec.max_seq_length:
            return min(self.args.max_length, int(self.spec.max_seq_length))
        return self.args.max_length


def read_model(directory: str | Path, *, kind: str = "auto") -> ModelRecipe:
    """``kind``: auto (an embedder, or what a sequence-classification checkpoint says it is), embedding, or
    rerank (which also serves a causal LM by its last token's yes / no logits, as Qwen3-Reranker)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"model directory {directory} does not exist")
    routed = None
    if not (directory / "config.json").is_file() and (directory / "modules.json").is_file():
        # A Router folder (inference-free SPLADE): its document side's Transformer folder holds the model.
        routed = read_sentence_spec(directory)
        if routed.transformer is not None:
            directory = routed.transformer
    hf_config = read_json(directory / "config.json")
    scoring = registry.classifier_for(hf_config)
    score_ids: Sequence[int] | None = None
    head_cls = None
    logit_score = read_logit_score(directory) if scoring is None else None
    if scoring is not None:
        if kind == "embedding":
            raise ModelLoadError(f"{directory} is a sequence-classification checkpoint "
                                 f"({hf_config.get('architectures')}); it cannot serve embeddings")
        make_args, model_cls, head_cls = scoring
        spec = _cross_encoder_spec(directory)
        classifier = read_classifier_spec(directory, hf_config)
    else:
        make_args, model_cls = registry.resolve(hf_config)
        archs = hf_config.get("architectures") or []
        if logit_score is not None and kind == "embedding":
            raise ModelLoadError(f"{directory} is a sentence-transformers CrossEncoder (LogitScore) reranker; it "
                                 "cannot serve embeddings")
        scored = kind == "rerank" or logit_score is not None
        if scored and not (model_cls.causal and any(a.endswith("ForCausalLM") for a in archs)):
            raise ModelLoadError(
                f"{'--kind rerank' if logit_score is None else 'a LogitScore reranker'} needs a causal language "
                f"model (a *ForCausalLM checkpoint, scored by its yes / no "
                f"logits as Qwen3-Reranker) or a sequence-classification checkpoint; {directory} is {archs}")
        if logit_score is not None:
            # sentence-transformers 6's own format: its token ids, its chat template, its activation.
            score_ids, chat = logit_score
            spec = _cross_encoder_spec(directory)
            classifier = dataclasses.replace(read_classifier_spec(directory, {"id2label": {"0": "score"}}),
                                             template=chat)
        elif scored:
            # A plain causal-LM folder under --kind rerank: the Qwen3-Reranker model card's recipe.
            score_ids = _yes_no_ids(directory)
            spec = _cross_encoder_spec(directory)
            classifier = ClassifierSpec(("yes",), "sigmoid", QWEN3_RERANKER)
        else:
            spec, classifier = routed or read_sentence_spec(directory), None
    return ModelRecipe(directory=directory, hf_config=hf_config, args=make_args(hf_config), encoder_cls=model_cls,
                       spec=spec, head_cls=head_cls, classifier=classifier, score_ids=score_ids)


def build_model(recipe: ModelRecipe, *, dtype: torch.dtype, device: torch.device, kernels: Kernels = Kernels()
                ) -> LoadedModel:
    """The recipe's encoder, built with ``kernels``, its head and Dense layers, with the checkpoint's weights."""
    directory, model_cls, classifier = recipe.directory, recipe.encoder_cls, recipe.classifier
    checkpoint = SafetensorsCheckpoint(directory)
    head = None
    ignored = model_cls.ignored_weights
    with torch.device("meta"):
        encoder = model_cls(recipe.args, kernels)
        if recipe.head_cls is not None:
            head = recipe.head_cls(encoder.hidden_size, classifier.num_labels, recipe.hf_config)
    if recipe.score_ids is not None:
        rows = _lm_head_rows(directory, checkpoint, model_cls.weight_prefixes, recipe.score_ids, dtype)
        head = TokenLogitHead(rows.to(device)).eval()
    elif head is not None:
        load_weights(head, checkpoint, head.weight_maps(), ignored=(r".*",), dtype=dtype, device=device)
        ignored = ignored + head_tensor_names(head, checkpoint.names())
        head.eval()
    load_weights(
        encoder,
        checkpoint,
        encoder.weight_maps() if hasattr(encoder, "weight_maps") else encoder.weight_map(),
        ignored=ignored,
        prefixes=model_cls.weight_prefixes,
        dtype=dtype,
        device=device,
    )
    encoder.eval()
    dense = nn.ModuleList(_load_dense(folder, dtype, device) for folder in recipe.spec.dense).eval()
    pylate = recipe.spec.pylate
    sparse = colbert = None
    if pylate is not None:
        _check_pylate(recipe, encoder)
        colbert = TokenVectors(nn.Sequential(*dense), _dense_width(dense, encoder.hidden_size), skip_first=0,
                               pylate=pylate, tokens=pylate_tokens(directory, pylate)).eval()
        dense = nn.ModuleList()
    if recipe.spec.splade is not None:
        if not hasattr(encoder, "word_embeddings") or not hasattr(recipe.args, "vocab_size"):
            raise ModelLoadError(f"{directory}: SPLADE is served for BERT-family masked LMs; this is "
                                 f"{type(encoder).__name__}")
        untied = "cls.predictions.decoder.weight" in checkpoint.names()
        with torch.device("meta"):
            mlm = MlmHead(encoder.hidden_size, recipe.args.vocab_size, recipe.hf_config, untied=untied)
        load_weights(mlm, checkpoint, mlm.weight_maps(), ignored=(r".*",), dtype=dtype, device=device)
        if not untied:
            mlm.tied = encoder.word_embeddings.weight
        query = load_static_query(recipe.spec.static_query) if recipe.spec.static_query is not None else None
        sparse = SparseHead(mlm.eval(), recipe.spec.splade, query)
    lexical = None
    if sparse is None and classifier is None and colbert is None and not model_cls.causal:
        lexical = load_lexical(directory, encoder.hidden_size, dtype, device)
        colbert = load_colbert(directory, encoder.hidden_size, dtype, device)

    dims = _dense_width(dense, encoder.hidden_size) if pylate is None else colbert.width

    if classifier is not None:
        dims = classifier.num_labels
    if sparse is not None:
        dims = recipe.args.vocab_size
    return LoadedModel(
        directory=directory,
        name=directory.name,
        encoder=encoder,
        dense=dense,
        spec=recipe.spec,
        dtype=dtype,
        device=device,
        hidden_size=encoder.hidden_size,
        dimensions=dims,
        max_length=recipe.max_length,
        hf_config=recipe.hf_config,
        head=head,
        classifier=classifier,
        sparse=sparse,
        lexical=lexical,
        colbert=colbert,
    )


def load_model(directory: str | Path, *, dtype: torch.dtype, device: torch.device, kind: str = "auto",
               kernels: Kernels = Kernels()) -> LoadedModel:
    """:func:`read_model` then :func:`build_model`: a folder loaded with the given kernels (by default those that
    run anywhere)."""
    return build_model(read_model(directory, kind=kind), dtype=dtype, device=device, kernels=kernels)

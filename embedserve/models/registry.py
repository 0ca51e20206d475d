"""Which model class serves which checkpoint: by ``architectures``, then by ``model_type``.

A config whose ``auto_map`` points a model class at remote code (``"AutoModel": "repo--modeling_x.Class"``) was
saved for code that embedserve never runs. It is served only when its architecture is in
:data:`REMOTE_CODE`: remote-code originals whose computation and weight names an embedserve model reproduces
(and that the tests check against transformers' native port). Everything else with remote code is refused by
name, never guessed from ``model_type`` (jina-embeddings-v2 says ``bert`` and uses ALiBi).
"""

from __future__ import annotations

from typing import Any, Callable

from embedserve.errors import ModelLoadError
from embedserve.models import bert, classifier, distilbert, gemma3, gte, llama, modernbert, mpnet, nomicbert

# name -> (args builder, model class)
_BERT = (bert.BertArgs.from_hf_config, bert.BertModel)
_DISTILBERT = (distilbert.DistilBertArgs.from_hf_config, distilbert.DistilBertModel)
_MODERNBERT = (modernbert.ModernBertArgs.from_hf_config, modernbert.ModernBertModel)
_MPNET = (mpnet.MPNetArgs.from_hf_config, mpnet.MPNetModel)
_NOMIC = (nomicbert.nomic_args, nomicbert.NomicBertModel)
_GTE = (gte.GteArgs.from_hf_config, gte.GteModel)
_LLAMA = (llama.LlamaArgs.from_hf_config, llama.LlamaModel)
_GEMMA3 = (gemma3.Gemma3Args.from_hf_config, gemma3.Gemma3Model)

ARCHITECTURES: dict[str, tuple[Callable[[dict], Any], type]] = {
    "BertModel": _BERT,
    "BertForMaskedLM": _BERT,
    "BertForPreTraining": _BERT,
    "RobertaModel": _BERT,
    "RobertaForMaskedLM": _BERT,
    "XLMRobertaModel": _BERT,
    "XLMRobertaForMaskedLM": _BERT,
    "DistilBertModel": _DISTILBERT,
    "DistilBertForMaskedLM": _DISTILBERT,
    "ModernBertModel": _MODERNBERT,
    "ModernBertForMaskedLM": _MODERNBERT,
    "MPNetModel": _MPNET,
    "MPNetForMaskedLM": _MPNET,
    "NomicBertModel": _NOMIC,
    "NomicBertForMaskedLM": _NOMIC,
    "GteModel": _GTE,
    "GteForMaskedLM": _GTE,
    "LlamaModel": _LLAMA,
    "LlamaForCausalLM": _LLAMA,
    "MistralModel": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2Model": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3Model": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "Gemma3TextModel": _GEMMA3,
    "Gemma3ForCausalLM": _GEMMA3,
}

MODEL_TYPES: dict[str, tuple[Callable[[dict], Any], type]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "distilbert": _DISTILBERT,
    "modernbert": _MODERNBERT,
    "mpnet": _MPNET,
    "nomic_bert": _NOMIC,
    "gte": _GTE,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
}


# Sequence-classification checkpoints (cross-encoders, classifiers): the encoder, and the head on top of it.
CLASSIFIERS: dict[str, tuple[Callable[[dict], Any], type, type]] = {
    "BertForSequenceClassification": (*_BERT, classifier.BertHead),
    "RobertaForSequenceClassification": (*_BERT, classifier.RobertaHead),
    "XLMRobertaForSequenceClassification": (*_BERT, classifier.RobertaHead),
    "ModernBertForSequenceClassification": (*_MODERNBERT, classifier.ModernBertHead),
}


def classifier_for(cfg: dict) -> tuple[Callable[[dict], Any], type, type] | None:
    """The (args builder, encoder class, head class) of a sequence-classification checkpoint; None for an
    embedder. A ``*ForSequenceClassification`` this package has no head for is refused by name."""
    for arch in cfg.get("architectures") or ():
        if arch in CLASSIFIERS:
            return CLASSIFIERS[arch]
        if arch.endswith("ForSequenceClassification"):
            raise ModelLoadError(f"sequence classification with {arch} is not supported; supported: "
                                 f"{', '.join(sorted(CLASSIFIERS))}")
    return None


# Remote-code architecture -> what serves it (nomic-ai/nomic-bert-2048's NomicBertModel and
# NomicBertForPreTraining; Alibaba-NLP/new-impl's NewModel, NewForMaskedLM, and the GteModel name
# snowflake-arctic-embed-m-v2.0 gives the same code).
REMOTE_CODE: dict[str, tuple[Callable[[dict], Any], type]] = {
    "NomicBertModel": _NOMIC,
    "NomicBertForPreTraining": _NOMIC,
    "NewModel": _GTE,
    "NewForMaskedLM": _GTE,
    "GteModel": _GTE,
}


def remote_code(cfg: dict) -> list[str]:
    """The model classes ``auto_map`` sends to remote code (tokenizer-only entries do not count)."""
    auto_map = cfg.get("auto_map")
    if not isinstance(auto_map, dict):
        return []
    return [f"{k}: {v}" for k, v in auto_map.items() if k.startswith(("AutoModel", "AutoConfig"))]


def resolve(cfg: dict) -> tuple[Callable[[dict], Any], type]:
    remote = remote_code(cfg)
    if remote:
        for arch in cfg.get("architectures") or ():
            if arch in REMOTE_CODE:
                return REMOTE_CODE[arch]
        mappings = ", ".join(f"{a} -> {REMOTE_CODE[a][1].__name__}" for a in sorted(REMOTE_CODE))
        raise ModelLoadError(
            f"config.json's auto_map points at remote code ({'; '.join(remote)}) for architectures="
            f"{cfg.get('architectures')!r}, model_type={cfg.get('model_type')!r}. embedserve never runs remote code; "
            f"it serves a remote-code checkpoint only when the architecture is one it implements itself: {mappings}"
        )
    for arch in cfg.get("architectures") or ():
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    model_type = cfg.get("model_type")
    if model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise ModelLoadError(
        f"unsupported model: architectures={cfg.get('architectures')!r}, model_type={model_type!r}. "
        f"Supported architectures: {', '.join(sorted(ARCHITECTURES))}; "
        f"model types: {', '.join(sorted(MODEL_TYPES))}"
    )

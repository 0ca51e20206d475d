"""Which model class serves which checkpoint: by ``architectures``, then by ``model_type``."""

from __future__ import annotations

from typing import Any, Callable

from embedserve.errors import ModelLoadError
from embedserve.models import bert, distilbert, gemma3, llama, modernbert

# name -> (args builder, model class)
_BERT = (bert.BertArgs.from_hf_config, bert.BertModel)
_DISTILBERT = (distilbert.DistilBertArgs.from_hf_config, distilbert.DistilBertModel)
_MODERNBERT = (modernbert.ModernBertArgs.from_hf_config, modernbert.ModernBertModel)
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
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": _GEMMA3,
}


def resolve(cfg: dict) -> tuple[Callable[[dict], Any], type]:
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

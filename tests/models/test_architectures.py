"""Embedding folders of the architectures the README lists beyond the base classes: RobertaModel and the
masked-LM / causal-LM checkpoints (encoder nested under a prefix, a head beside it), each served and compared
with transformers' own forward of the encoder inside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from on_device import cos_min
from tiny import embed_with, hf_embed, hf_embed_each, mixed_texts, save_folder

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

TEXTS = mixed_texts(12, seed=7)
ENCODER = dict(vocab_size=30522, hidden_size=36, num_hidden_layers=2, num_attention_heads=6, intermediate_size=50,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DECODER = dict(vocab_size=30522, hidden_size=40, intermediate_size=74, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=12, max_position_embeddings=512, tie_word_embeddings=False)


def _perturb(model) -> None:
    """Norms away from identity and biases away from zero, and peaky attention: a weight left unloaded, or a
    position off by one, shows in the vector."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            elif any(n in name for n in ("query.weight", "key.weight", "q_proj.weight", "k_proj.weight")):
                p.mul_(8)


def _roberta(cls_name: str):
    import transformers

    config = transformers.RobertaConfig(**ENCODER, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    return getattr(transformers, cls_name)(config)


@pytest.mark.parametrize("cls_name", ["RobertaModel", "RobertaForMaskedLM"])
def test_roberta_folders_give_transformers_vectors(tmp_path, cls_name):
    torch.manual_seed(4)
    model = _roberta(cls_name)
    _perturb(model)
    save_folder(model, tmp_path, pooling="mean", normalize=False)
    encoder = model if cls_name == "RobertaModel" else model.roberta
    want = hf_embed(encoder, tmp_path, TEXTS, pooling="mean")
    got = embed_with(tmp_path, TEXTS)
    assert F.cosine_similarity(got, want).min() >= cos_min("float32")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls_name", ["Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                                      "Qwen2ForCausalLM"])
def test_causal_lm_checkpoints_serve_as_embedding_folders(tmp_path, cls_name):
    """A *ForCausalLM checkpoint (model. prefix, an lm_head beside it) in a sentence-transformers folder with
    last-token pooling, as e5-mistral and Qwen3-Embedding folders are published."""
    import transformers

    torch.manual_seed(5)
    config_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    model = getattr(transformers, cls_name)(config_cls(**DECODER))
    _perturb(model)
    save_folder(model, tmp_path, pooling="last", normalize=False)
    want = hf_embed_each(model.model, tmp_path, TEXTS, pooling="last")
    got = embed_with(tmp_path, TEXTS)
    assert F.cosine_similarity(got, want).min() >= cos_min("float32")
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

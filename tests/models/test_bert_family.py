"""Tiny random BERT, XLM-RoBERTa, DistilBERT, ModernBERT, MPNet, NomicBERT and GTE checkpoints: embedserve's packed forward vs
transformers' padded one, and each as a sentence-transformers folder vs SentenceTransformer.encode."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F

from on_device import BATCH_INVARIANCE, FP32_ATTENTION, HALF_ATTENTION, cos_min, model_config
from tiny import build_tiny_encoder, embed_with, hf_embed, mixed_texts
from embedserve.config import EngineConfig
from embedserve.engine.front import Engine

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE


@pytest.fixture(scope="module", params=["bert", "xlm-roberta", "distilbert", "modernbert", "mpnet", "nomicbert", "gte"])
def tiny(request, tmp_path_factory):
    kind = request.param
    path = tmp_path_factory.mktemp(kind)
    model = build_tiny_encoder(path, kind, pooling="mean")
    return kind, path, model


@pytest.mark.parametrize("attention", FP32_ATTENTION)
def test_fp32_matches_transformers(tiny, attention):
    kind, path, model = tiny
    texts = mixed_texts(40) + [""]
    got = embed_with(path, texts, attention=attention)
    ref = hf_embed(model, path, texts, pooling="mean")
    cos = F.cosine_similarity(got, ref)
    assert cos.min() >= cos_min("float32"), (kind, cos.min())


@pytest.mark.parametrize("attention", HALF_ATTENTION)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_transformers_fp32(tiny, dtype, attention):
    kind, path, model = tiny
    texts = mixed_texts(24, seed=1)
    got = embed_with(path, texts, dtype=dtype, attention=attention)
    ref = hf_embed(model, path, texts, pooling="mean")
    assert F.cosine_similarity(got, ref).min() >= cos_min(dtype)


@pytest.mark.parametrize("kind", ["bert", "gte"])  # gte-*-en-v1.5 and arctic-embed-m-v2.0 pool the CLS token
def test_cls_pooling_and_normalize(tmp_path, kind):
    model = build_tiny_encoder(tmp_path, kind, pooling="cls", normalize=True, seed=3)
    texts = mixed_texts(10, seed=2)
    got = embed_with(tmp_path, texts, each=False)
    ref = F.normalize(hf_embed(model, tmp_path, texts, pooling="cls"), dim=1)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(texts)))


def test_batch_invariance_alone_vs_inside_a_mixed_batch_of_64(tiny):
    kind, path, _ = tiny
    texts = mixed_texts(64, seed=5)
    engine = Engine(EngineConfig(model=model_config(path)))
    engine.start()
    try:
        batch = asyncio.run(engine.embed(texts)).vectors
        for i in (0, 17, 63):
            alone = asyncio.run(engine.embed([texts[i]])).vectors[0]
            assert (alone - batch[i]).abs().max() <= BATCH_INVARIANCE, (kind, i)
    finally:
        engine.shutdown()


def test_the_folder_matches_sentence_transformers_and_the_log_names_the_architecture(tiny, caplog):
    from sentence_transformers import SentenceTransformer

    kind, path, _ = tiny
    texts = mixed_texts(12, seed=7) + [""]
    ref = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
    caplog.set_level("INFO")
    got = embed_with(path, texts)
    assert F.cosine_similarity(got, ref).min() >= cos_min("float32"), kind
    absolute = "2 layers, global bidirectional attention, 6 heads; absolute positions (offset {}), no RoPE"
    line = {
        "bert": "BertModel -> BertModel: " + absolute.format(0),
        "xlm-roberta": "XLMRobertaModel -> BertModel: " + absolute.format(2),
        "distilbert": "DistilBertModel -> DistilBertModel: " + absolute.format(0),
        # local_attention 16: |i - j| <= 8, a window of 9 in embedserve's terms
        "modernbert": "ModernBertModel -> ModernBertModel: 4 layers, global bidirectional x1, window 9 bidirectional "
                      "x2, global bidirectional x1; 4 heads of 12; global layers RoPE base 160000; local layers RoPE "
                      "base 10000",
        "mpnet": "MPNetModel -> MPNetModel: 2 layers, global bidirectional attention, 6 heads; absolute positions "
                 "(offset 2) plus a relative position bias (32 buckets, max distance 128), no RoPE",
        "nomicbert": "NomicBertModel -> NomicBertModel: 3 layers, global bidirectional attention, 4 heads of 12; "
                     "RoPE base 1000; gated MLP (silu)",
        "gte": "GteModel -> GteModel: 3 layers, global bidirectional attention, 4 heads of 12; RoPE base 160000; "
               "gated MLP (gelu)",
    }[kind]
    assert f"architecture: {line}" in caplog.text


def test_a_distilbert_checkpoint_saved_with_its_masked_lm_head(tmp_path):
    """DistilBertForMaskedLM nests the encoder under `distilbert.` and carries vocab_* heads that serving ignores."""
    import transformers

    from tiny import save_folder

    torch.manual_seed(5)
    config = transformers.DistilBertConfig(dim=36, n_layers=2, n_heads=6, hidden_dim=50, dropout=0.0,
                                           attention_dropout=0.0)
    mlm = save_folder(transformers.DistilBertForMaskedLM(config), tmp_path, pooling="mean", normalize=False)
    texts = mixed_texts(8, seed=3)
    got = embed_with(tmp_path, texts)
    ref = hf_embed(mlm.distilbert, tmp_path, texts, pooling="mean")
    assert F.cosine_similarity(got, ref).min() >= cos_min("float32")


def test_modernbert_in_the_spelling_of_the_published_checkpoints(tmp_path):
    """answerdotai/ModernBERT-base and its descendants say global_attn_every_n_layers, global_rope_theta and
    local_rope_theta, not layer_types and rope_parameters."""
    import json

    model = build_tiny_encoder(tmp_path, "modernbert", seed=4)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        cfg.pop(key)
    cfg.update(global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    texts = mixed_texts(16, seed=5)
    got = embed_with(tmp_path, texts)
    assert F.cosine_similarity(got, hf_embed(model, tmp_path, texts, pooling="mean")).min() >= cos_min("float32")

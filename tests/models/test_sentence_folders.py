"""Whole sentence-transformers folders around tiny decoders, embedded by embedserve and by SentenceTransformer."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
import torch.nn.functional as F

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import InvalidRequest
from on_device import model_config
from tiny import build_tiny_decoder, mixed_texts

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery: ", "document": ""}


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-embedding")
    build_tiny_decoder(path, "qwen3", pooling="last", normalize=True, seed=11)
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": PROMPTS, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 200, "do_lower_case": False}))
    return path


def test_qwen3_folder_with_prompts_matches_sentence_transformers(qwen3_folder):
    from sentence_transformers import SentenceTransformer

    texts = mixed_texts(20, seed=6) + ["", "word " * 400]
    st = SentenceTransformer(str(qwen3_folder), device="cpu")
    engine = Engine(EngineConfig(model=model_config(qwen3_folder)))
    engine.start()
    try:
        for prompt in (None, "query", "document"):
            ref = st.encode(texts, prompt_name=prompt, convert_to_tensor=True)
            got = asyncio.run(engine.embed(texts, EmbedOptions(prompt_name=prompt)))
            assert F.cosine_similarity(got.vectors, ref).min() >= 0.9999, prompt
            torch.testing.assert_close(got.vectors.norm(dim=1), torch.ones(len(texts)))
        # Prompt tokens count as embedded tokens, like sentence-transformers tokenizes them.
        plain = asyncio.run(engine.embed(["hello"])).token_counts[0]
        prompted = asyncio.run(engine.embed(["hello"], EmbedOptions(prompt_name="query"))).token_counts[0]
        prompt_tokens = len(st.tokenizer(PROMPTS["query"] + "hello")["input_ids"])
        assert prompted == prompt_tokens > plain
        with pytest.raises(InvalidRequest, match="unknown prompt_name 'nope'; this model's prompts: document, query"):
            asyncio.run(engine.embed(["x"], EmbedOptions(prompt_name="nope")))
    finally:
        engine.shutdown()


def test_configured_prompts_join_the_folders_and_may_name_the_default(qwen3_folder):
    """--config's prompts add to the folder's (or replace one of the same name) and may set the default."""
    from sentence_transformers import SentenceTransformer

    from embedserve.errors import ConfigError

    texts = mixed_texts(6, seed=9)
    st = SentenceTransformer(str(qwen3_folder), device="cpu")
    engine = Engine(EngineConfig(model=model_config(
        qwen3_folder, prompts=(("title", "Title: "), ("document", "Doc: ")), default_prompt_name="title")))
    engine.start()
    try:
        for name, text in ((None, "Title: "), ("document", "Doc: "), ("query", PROMPTS["query"])):
            ref = st.encode(texts, prompt=text, convert_to_tensor=True)
            got = asyncio.run(engine.embed(texts, EmbedOptions(prompt_name=name)))
            assert F.cosine_similarity(got.vectors, ref).min() >= 0.9999, name
    finally:
        engine.shutdown()
    with pytest.raises(ConfigError, match="default_prompt_name 'passage' is not one of this model's prompts: "
                                          "document, query, title"):
        Engine(EngineConfig(model=model_config(qwen3_folder, prompts=(("title", "T: "),),
                                               default_prompt_name="passage")))


def test_a_folders_default_prompt_name_applies_when_a_request_names_none(tmp_path):
    """config_sentence_transformers.json's default_prompt_name (as some published folders set it): a request
    without prompt_name gets that prompt, as SentenceTransformer.encode does; naming another prompt overrides it."""
    from sentence_transformers import SentenceTransformer

    build_tiny_decoder(tmp_path, "qwen3", pooling="last", normalize=True, seed=12)
    (tmp_path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": PROMPTS, "default_prompt_name": "query", "similarity_fn_name": "cosine"}))
    texts = mixed_texts(8, seed=13)
    st = SentenceTransformer(str(tmp_path), device="cpu")
    assert st.default_prompt_name == "query"
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    try:
        got = asyncio.run(engine.embed(texts)).vectors
        plain = asyncio.run(engine.embed(texts, EmbedOptions(prompt_name="document"))).vectors
    finally:
        engine.shutdown()
    torch.testing.assert_close(got, st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got, st.encode(texts, prompt=PROMPTS["query"], convert_to_tensor=True),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(plain, st.encode(texts, prompt="", convert_to_tensor=True), atol=1e-5, rtol=1e-4)
    assert F.cosine_similarity(got, plain).max() < 0.999  # the default prompt really changed the vectors


def add_dense(folder, index: int, n_in: int, n_out: int, seed: int) -> dict:
    from safetensors.torch import save_file

    sub = folder / f"{index}_Dense"
    sub.mkdir()
    (sub / "config.json").write_text(json.dumps({
        "in_features": n_in, "out_features": n_out, "bias": False,
        "activation_function": "torch.nn.modules.linear.Identity",
    }))
    torch.manual_seed(seed)
    save_file({"linear.weight": torch.randn(n_out, n_in) / n_in**0.5}, sub / "model.safetensors")
    return {"idx": index, "name": str(index), "path": sub.name, "type": "sentence_transformers.models.Dense"}


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    """EmbeddingGemma's shape: bidirectional Gemma 3, mean pooling, two Dense layers, Normalize, prompts."""
    path = tmp_path_factory.mktemp("embeddinggemma")
    build_tiny_decoder(path, "gemma3-bidirectional", pooling="mean", seed=12)
    modules = json.loads((path / "modules.json").read_text())
    modules += [add_dense(path, 2, 40, 96, seed=1), add_dense(path, 3, 96, 40, seed=2),
                {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (path / "modules.json").write_text(json.dumps(modules))
    prompts = {"query": "task: search result | query: ", "document": "title: none | text: "}
    (path / "config_sentence_transformers.json").write_text(
        json.dumps({"prompts": prompts, "default_prompt_name": None})
    )
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    return path


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_gemma_folder_with_dense_and_prompts_matches_sentence_transformers(gemma_folder, kernel):
    from sentence_transformers import SentenceTransformer

    texts = mixed_texts(16, seed=8) + ["", "word " * 300]
    st = SentenceTransformer(str(gemma_folder), device="cpu")
    engine = Engine(EngineConfig(model=model_config(gemma_folder, pool_kernel=kernel)))
    engine.start()
    try:
        assert engine.dimensions == 40 and engine.model.spec.normalize and len(engine.model.dense) == 2
        for prompt in ("query", "document"):
            ref = st.encode(texts, prompt_name=prompt, convert_to_tensor=True)
            got = asyncio.run(engine.embed(texts, EmbedOptions(prompt_name=prompt))).vectors
            assert F.cosine_similarity(got, ref).min() >= 0.9999, prompt
    finally:
        engine.shutdown()

"""SPLADE (sentence-transformers SparseEncoder folders) against sentence-transformers' own ``encode`` on tiny random
masked LMs: the same nonzero token ids and weights."""

from __future__ import annotations

import asyncio

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import InvalidRequest, WrongModelKind
from embedserve.kernels.pool_encode import triton_available
from on_device import model_config
from tiny import build_tiny_encoder, build_tiny_inference_free_splade, build_tiny_splade, long_text, mixed_texts

TEXTS = mixed_texts(10, seed=41) + ["a", long_text(700, seed=2)]  # the last one past 512 tokens: truncated


def reference(encoder, texts):
    return encoder.encode(texts, convert_to_tensor=True).to_dense()


def check(got, want):
    assert len(got) == len(want)
    for (ids, weights), row in zip(got, want):
        nonzero = row.nonzero().squeeze(1)
        assert torch.equal(ids, nonzero)
        torch.testing.assert_close(weights, row[nonzero], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling, activation, untied", [("max", "relu", False), ("sum", "relu", True),
                                                         ("max", "log1p_relu", False)])
def test_the_nonzero_weights_are_sentence_transformers(tmp_path, pooling, activation, untied):
    folder = tmp_path / "splade"
    encoder = build_tiny_splade(folder, pooling=pooling, activation=activation, untied=untied, seed=7)
    engine = Engine(EngineConfig(model=model_config(folder)))
    engine.start()
    try:
        assert engine.info.kind == "sparse" and engine.info.dimensions == 30522 and engine.info.pooling == "splade"
        result = asyncio.run(engine.embed(TEXTS, EmbedOptions(sparse=True)))
        want = reference(encoder, TEXTS)
        check(result.sparse, want)
        assert all(0 < len(ids) < 30522 for ids, _ in result.sparse)
        top = asyncio.run(engine.embed(TEXTS[:3], EmbedOptions(sparse=True, top_k=10))).sparse
        for (ids, weights), row in zip(top, want):
            best = row.topk(10).indices.sort().values
            assert torch.equal(ids, best) and torch.allclose(weights, row[best], atol=1e-5)
    finally:
        engine.shutdown()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_the_triton_pooling_in_the_engine(tmp_path):
    folder = tmp_path / "splade"
    encoder = build_tiny_splade(folder, seed=8)
    engine = Engine(EngineConfig(model=model_config(folder, pool_kernel="triton")))
    engine.start()
    try:
        check(asyncio.run(engine.embed(TEXTS[:4], EmbedOptions(sparse=True))).sparse, reference(encoder, TEXTS[:4]))
    finally:
        engine.shutdown()


def test_dense_and_sparse_requests_to_the_other_kind_name_it(tmp_path):
    build_tiny_splade(tmp_path / "splade", seed=9)
    build_tiny_encoder(tmp_path / "dense", "bert", seed=9)
    sparse = Engine(EngineConfig(model=model_config(tmp_path / "splade")))
    dense = Engine(EngineConfig(model=model_config(tmp_path / "dense")))
    sparse.start()
    dense.start()
    try:
        with pytest.raises(WrongModelKind, match="the served model is a sparse model \\(SPLADE.*\\(kind 'sparse'\\)"):
            asyncio.run(sparse.embed(["x"]))
        with pytest.raises(WrongModelKind, match="needs a sparse model \\(SPLADE.*kind 'embedding'"):
            asyncio.run(dense.embed(["x"], EmbedOptions(sparse=True)))
        with pytest.raises(InvalidRequest) as err:
            asyncio.run(sparse.embed(["x"], EmbedOptions(sparse=True, dimensions=8)))
        assert err.value.param == "dimensions"
        with pytest.raises(InvalidRequest) as err:
            asyncio.run(sparse.embed(["x"], EmbedOptions(sparse=True, top_k=0)))
        assert err.value.param == "sparse_top_k"
    finally:
        sparse.shutdown()
        dense.shutdown()


def test_an_inference_free_folder_weighs_queries_without_a_forward_and_runs_documents(tmp_path):
    folder = tmp_path / "free"
    encoder = build_tiny_inference_free_splade(folder, seed=15)
    queries = ["what is a sparse vector", "a a a cat", "the best pizza in town", long_text(700, seed=3)]
    engine = Engine(EngineConfig(model=model_config(folder)))
    engine.start()
    try:
        assert engine.info.kind == "sparse"
        want = encoder.encode_query(queries, convert_to_tensor=True).to_dense()
        steps = engine.scheduler.stats.steps
        for options in (EmbedOptions(sparse=True, query=True), EmbedOptions(sparse=True, prompt_name="query")):
            got = asyncio.run(engine.embed(queries, options))
            check(got.sparse, want)
            assert got.token_counts[:3] == [len(encoder.tokenizer(q, add_special_tokens=False)["input_ids"])
                                            for q in queries[:3]]
        assert engine.scheduler.stats.steps == steps  # no forward pass ran for the queries
        docs = asyncio.run(engine.embed(TEXTS, EmbedOptions(sparse=True)))
        check(docs.sparse, encoder.encode_document(TEXTS, convert_to_tensor=True).to_dense())
    finally:
        engine.shutdown()

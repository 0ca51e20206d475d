"""Multi-vector outputs: bge-m3's colbert vectors (``colbert_linear.pt`` beside a tiny random XLM-RoBERTa) against
FlagEmbedding's ``BGEM3FlagModel.encode(return_colbert_vecs=True)``, and all three bge-m3 outputs from one request
and one forward pass."""

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
from tiny import build_tiny_bge_m3, build_tiny_encoder, flag_m3_reference, long_text, mixed_texts

TEXTS = mixed_texts(8, seed=47) + ["a", long_text(700, seed=5)]  # the last one past 512 tokens: truncated


def check_vectors(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(g, w, dim=1).min()) >= 0.99999
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def m3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m3") / "tiny-bge-m3"
    build_tiny_bge_m3(folder, seed=21)
    reference = flag_m3_reference(folder, TEXTS, colbert=True)
    engine = Engine(EngineConfig(model=model_config(folder)))
    engine.start()
    yield engine, reference
    engine.shutdown()


def test_colbert_vectors_are_flagembeddings_alone_and_packed(m3):
    engine, (_, _, colbert) = m3
    result = asyncio.run(engine.embed(TEXTS, EmbedOptions(multi_vector=True)))
    check_vectors(result.multi, colbert)
    assert result.vectors.shape == (len(TEXTS), 0) and result.sparse is None
    assert result.token_counts == [len(v) + 1 for v in colbert]  # every token counted, the CLS included

    async def each_alone():  # one-text requests packed into shared steps, beside dense ones
        return await asyncio.gather(*(engine.embed([t], EmbedOptions(multi_vector=True)) for t in TEXTS),
                                    *(engine.embed([t]) for t in TEXTS))

    results = asyncio.run(each_alone())
    check_vectors([r.multi[0] for r in results[: len(TEXTS)]], colbert)


def test_dense_sparse_and_colbert_from_one_request_and_one_forward(m3):
    engine, (dense, lexical, colbert) = m3
    stats = engine.scheduler.stats
    before = stats.steps
    asyncio.run(engine.embed(TEXTS))
    dense_steps = stats.steps - before
    before = stats.steps
    all_three = asyncio.run(engine.embed(TEXTS, EmbedOptions(multi_vector=True, include_dense=True,
                                                             include_sparse=True)))
    assert stats.steps - before == dense_steps  # the same forward passes as the dense vectors alone
    check_vectors(all_three.multi, colbert)
    torch.testing.assert_close(all_three.vectors, dense, atol=1e-5, rtol=1e-4)
    for (ids, weights), expected in zip(all_three.sparse, lexical):
        assert ids.tolist() == sorted(int(k) for k in expected)
        torch.testing.assert_close(weights, torch.tensor([float(expected[str(i)]) for i in ids.tolist()]),
                                   atol=1e-5, rtol=1e-5)
    sparse_and_vectors = asyncio.run(engine.embed(TEXTS, EmbedOptions(sparse=True, include_multi_vector=True)))
    check_vectors(sparse_and_vectors.multi, colbert)


def test_options_that_do_not_apply_name_their_field(m3, tmp_path):
    engine, _ = m3
    for options, field in ((EmbedOptions(include_sparse=True), "include_sparse"),
                           (EmbedOptions(multi_vector=True, late_chunking=True), "late_chunking"),
                           (EmbedOptions(multi_vector=True, encodings=("base64",)), "encoding_format"),
                           (EmbedOptions(multi_vector=True, dimensions=8), "dimensions")):
        with pytest.raises(InvalidRequest) as err:
            asyncio.run(engine.embed(["some text"], options))
        assert err.value.param == field
    build_tiny_encoder(tmp_path / "dense", "bert", seed=22)
    dense = Engine(EngineConfig(model=model_config(tmp_path / "dense")))
    dense.start()
    try:
        with pytest.raises(WrongModelKind, match="multi-vector"):
            asyncio.run(dense.embed(["x"], EmbedOptions(multi_vector=True)))
    finally:
        dense.shutdown()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_the_triton_kernel_normalises_the_token_vectors(tmp_path):
    folder = tmp_path / "m3"
    build_tiny_bge_m3(folder, seed=23)
    _, _, colbert = flag_m3_reference(folder, TEXTS[:3], colbert=True)
    engine = Engine(EngineConfig(model=model_config(folder, pool_kernel="triton")))
    engine.start()
    try:
        assert engine.pool_backend == "triton"
        check_vectors(asyncio.run(engine.embed(TEXTS[:3], EmbedOptions(multi_vector=True))).multi, colbert)
    finally:
        engine.shutdown()

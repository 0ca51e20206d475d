"""bge-m3's lexical weights (and its dense vector from the same forward) against FlagEmbedding's ``BGEM3FlagModel``
on a tiny random XLM-RoBERTa laid out as the published repository: ``sparse_linear.pt`` read with
``torch.load(weights_only=True)`` and a shape check, or ``sparse_linear.safetensors``."""

from __future__ import annotations

import asyncio

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import InvalidRequest, ModelLoadError
from on_device import model_config
from tiny import build_tiny_bge_m3, build_tiny_splade, flag_m3_reference, long_text, mixed_texts

# Repeated words (a token id twice keeps its larger weight), a one-word text, and one past 512 tokens (truncated).
TEXTS = mixed_texts(8, seed=43) + ["a", "the the the cat sat on the mat the end", long_text(700, seed=4)]


def check_lexical(got, want):
    assert len(got) == len(want)
    for (ids, weights), expected in zip(got, want):
        assert ids.tolist() == sorted(int(k) for k in expected)  # ascending ids, each once, zeros left out
        torch.testing.assert_close(weights, torch.tensor([float(expected[str(i)]) for i in ids.tolist()]),
                                   atol=1e-5, rtol=1e-5)


def start(folder, **options):
    engine = Engine(EngineConfig(model=model_config(folder, **options)))
    engine.start()
    return engine


@pytest.mark.parametrize("safetensors", [False, True])
def test_lexical_weights_and_the_dense_vector_are_flagembeddings(tmp_path, safetensors):
    folder = tmp_path / "m3"
    build_tiny_bge_m3(folder, seed=11)
    dense, lexical = flag_m3_reference(folder, TEXTS)
    if safetensors:  # the same layers in the format FlagEmbedding does not read, and no .pt beside them
        from safetensors.torch import save_file

        for name in ("sparse_linear", "colbert_linear"):
            save_file(torch.load(folder / f"{name}.pt", weights_only=True), str(folder / f"{name}.safetensors"))
            (folder / f"{name}.pt").unlink()
    assert any(len(w) < len(set(t.split())) for w, t in zip(lexical, TEXTS))  # some tokens weigh 0 and go
    engine = start(folder)
    try:
        assert engine.info.kind == "embedding" and engine.info.lexical
        both = asyncio.run(engine.embed(TEXTS, EmbedOptions(sparse=True, include_dense=True)))
        check_lexical(both.sparse, lexical)
        torch.testing.assert_close(both.vectors, dense, atol=1e-5, rtol=1e-4)
        sparse_only = asyncio.run(engine.embed(TEXTS, EmbedOptions(sparse=True)))
        assert sparse_only.vectors.shape == (len(TEXTS), 0)
        check_lexical(sparse_only.sparse, lexical)
        assert sparse_only.token_counts == both.token_counts
        # a dense request is answered as any embedding model's, with no sparse part
        plain = asyncio.run(engine.embed(TEXTS))
        assert plain.sparse is None
        torch.testing.assert_close(plain.vectors, dense, atol=1e-5, rtol=1e-4)

        async def each_alone():  # concurrent one-text requests, packed into shared steps with dense ones
            asked = [engine.embed([t], EmbedOptions(sparse=True, include_dense=True)) for t in TEXTS]
            return await asyncio.gather(*asked, *(engine.embed([t]) for t in TEXTS))

        results = asyncio.run(each_alone())
        check_lexical([r.sparse[0] for r in results[: len(TEXTS)]], lexical)
        torch.testing.assert_close(torch.cat([r.vectors for r in results[: len(TEXTS)]]), dense, atol=1e-5,
                                   rtol=1e-4)
        top = asyncio.run(engine.embed(TEXTS[:3], EmbedOptions(sparse=True, top_k=4))).sparse
        for (ids, weights), expected in zip(top, lexical):
            best = sorted(sorted(expected, key=lambda k: -expected[k])[:4], key=int)
            assert ids.tolist() == [int(k) for k in best]
    finally:
        engine.shutdown()


def test_options_that_do_not_apply_name_their_field(tmp_path):
    build_tiny_bge_m3(tmp_path / "m3", seed=12)
    build_tiny_splade(tmp_path / "splade", seed=12)
    m3, splade = start(tmp_path / "m3"), start(tmp_path / "splade")
    try:
        for engine, options, field in (
                (m3, EmbedOptions(include_dense=True), "include_dense"),  # dense only: nothing to include it in
                (m3, EmbedOptions(sparse=True, late_chunking=True), "late_chunking"),
                (m3, EmbedOptions(sparse=True, long_input="mean"), "long_input"),
                (m3, EmbedOptions(sparse=True, dimensions=8), "dimensions"),  # the sparse vectors have no width
                (splade, EmbedOptions(sparse=True, include_dense=True), "include_dense")):
            with pytest.raises(InvalidRequest) as err:
                asyncio.run(engine.embed(["some text"], options))
            assert err.value.param == field
        # dimensions cut the dense part of a request that includes it
        cut = asyncio.run(m3.embed(["some text"], EmbedOptions(sparse=True, include_dense=True, dimensions=8)))
        assert cut.vectors.shape == (1, 8) and abs(float(cut.vectors.norm()) - 1) < 1e-5
    finally:
        m3.shutdown()
        splade.shutdown()


def test_a_sparse_linear_that_is_not_a_linear_layer_is_refused(tmp_path):
    folder = tmp_path / "m3"
    model, _, _ = build_tiny_bge_m3(folder, seed=13)
    hidden = model.config.hidden_size
    torch.save({"weight": torch.zeros(2, hidden), "bias": torch.zeros(2)}, folder / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="sparse_linear.pt: weight \\(2, 36\\) and bias \\(2,\\)"):
        Engine(EngineConfig(model=model_config(folder)))
    torch.save({"weight": torch.zeros(1, hidden), "bias": torch.zeros(1), "extra": torch.zeros(1)},
               folder / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="'weight' and 'bias' tensors, got \\['bias', 'extra', 'weight'\\]"):
        Engine(EngineConfig(model=model_config(folder)))
    # anything but tensors: weights_only refuses to unpickle it
    torch.save({"weight": torch.zeros(1, hidden), "bias": torch.zeros(1), "note": _NotATensor()},
               folder / "sparse_linear.pt")
    with pytest.raises(ModelLoadError, match="cannot read sparse_linear \\(UnpicklingError"):
        Engine(EngineConfig(model=model_config(folder)))


class _NotATensor:
    pass


def test_lexical_rows_keep_each_ids_largest_weight_and_leave_zeros_out():
    from embedserve.models.lexical import lexical_rows

    rows = lexical_rows([[5, 7, 5, 9], [], [3]], torch.tensor([0.5, 0.0, 0.9, 0.2, 0.0]))
    assert [r[0].tolist() for r in rows] == [[5, 9], [], []]
    assert rows[0][1].tolist() == pytest.approx([0.9, 0.2])
    assert lexical_rows([], torch.empty(0)) == []

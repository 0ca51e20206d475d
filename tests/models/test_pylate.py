"""PyLate ColBERT folders: tiny random BERT and ModernBERT encoders made ColBERT models and saved by PyLate 1.6 (in
its own venv, tests/references/pylate.txt), served here, against ``pylate.models.ColBERT.encode(is_query=...)``:
every token's vector (cos >= 0.99999 in fp32) and the same tokens kept (query expansion, prefixes, the skiplist,
the lengths), under each of PyLate's query settings; and MaxSim scores against ``pylate.rank.rerank``."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError, WrongModelKind
from embedserve.models.sentence import read_model
from on_device import model_config
from tiny import build_tiny_colbert, long_text, mixed_texts


def _texts(seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    queries = ["what is a vector?", "a", "who wrote the (first) search engine, and when?",
               long_text(40, seed=seed)]  # past every query length here: cut
    documents = [t.replace(" the ", ", the ").replace(" of ", "; of ") + rng.choice([".", "!", "?"])
                 for t in mixed_texts(6, seed=seed)]  # punctuation for the skiplist; some past document_length
    return queries, documents + ["Hello, world!", "a"]


QUERIES, DOCUMENTS = _texts(3)
RERANK = [(QUERIES[0], DOCUMENTS[:5]), (QUERIES[2], DOCUMENTS[3:])]

# (backbone, PyLate's settings): hidden expansion is ColBERT's default (the [MASK] padding reads the text, nothing
# reads it); then expansion the text attends to, no expansion with another skiplist, and ModernBERT (4 layers with
# local windows of 9 tokens each side that the documents cross) with hidden expansion inside a window.
CASES = {
    "bert-hidden-expansion": ("bert", dict(embedding_size=16, query_length=12, document_length=40)),
    "bert-attended-expansion": ("bert", dict(embedding_size=16, query_length=10, document_length=32,
                                             attend_to_expansion_tokens=True)),
    "bert-no-expansion": ("bert", dict(embedding_size=24, query_length=9, document_length=48,
                                       do_query_expansion=False, skiplist_words=["!", "?", ";", "the"])),
    "modernbert-hidden-expansion": ("modernbert", dict(embedding_size=16, query_length=8, document_length=64)),
}


def check_vectors(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]  # the same tokens kept
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert float(torch.nn.functional.cosine_similarity(g, w, dim=1).min()) >= 0.99999
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=list(CASES))
def colbert(request, tmp_path_factory):
    kind, settings = CASES[request.param]
    folder = tmp_path_factory.mktemp("pylate") / request.param
    reference = build_tiny_colbert(folder, kind, queries=QUERIES, documents=DOCUMENTS, rerank=RERANK, seed=5,
                                   **settings)
    engine = Engine(EngineConfig(model=model_config(folder, dtype="float32")))
    engine.start()
    yield request.param, folder, engine, reference
    engine.shutdown()


def test_queries_and_documents_are_pylates_alone_and_packed(colbert):
    name, _, engine, (queries, documents, _) = colbert
    assert engine.kind == "multi_vector" and engine.info.multi_vector
    q = asyncio.run(engine.embed(QUERIES, EmbedOptions(multi_vector=True, query=True)))
    d = asyncio.run(engine.embed(DOCUMENTS, EmbedOptions(multi_vector=True)))
    check_vectors(q.multi, queries)
    check_vectors(d.multi, documents)
    assert q.vectors.shape == (len(QUERIES), 0)
    if "no-expansion" not in name:  # expanded queries all hold query_length tokens
        assert {len(v) for v in queries} == {CASES[name][1]["query_length"]}

    async def each_alone():  # one-text requests of both sides packed into shared steps
        return await asyncio.gather(*(engine.embed([t], EmbedOptions(multi_vector=True, query=True)) for t in QUERIES),
                                    *(engine.embed([t], EmbedOptions(multi_vector=True)) for t in DOCUMENTS))

    results = asyncio.run(each_alone())
    check_vectors([r.multi[0] for r in results[: len(QUERIES)]], queries)
    check_vectors([r.multi[0] for r in results[len(QUERIES):]], documents)


def test_rerank_scores_by_maxsim_as_pylate_ranks(colbert):
    _, _, engine, (_, _, ranked) = colbert
    for (query, docs), want in zip(RERANK, ranked):
        result = asyncio.run(engine.score([(query, d) for d in docs]))
        scores = engine.scores(result.vectors)[:, 0]
        order = sorted(range(len(docs)), key=lambda i: -float(scores[i]))
        assert order == [i for i, _ in want]
        torch.testing.assert_close(scores[order], torch.tensor([s for _, s in want]), atol=1e-4, rtol=1e-5)


def test_what_does_not_apply_is_a_400_naming_it(colbert):
    _, folder, engine, _ = colbert
    with pytest.raises(WrongModelKind):
        asyncio.run(engine.embed(["a"]))  # no single vector
    with pytest.raises(WrongModelKind):
        asyncio.run(engine.embed(["a"], EmbedOptions(sparse=True)))
    for options, field in ((EmbedOptions(multi_vector=True, include_dense=True), "include_dense"),
                           (EmbedOptions(multi_vector=True, truncate_start=True), "truncate"),
                           (EmbedOptions(multi_vector=True, dimensions=4), "dimensions")):
        with pytest.raises(InvalidRequest) as caught:
            asyncio.run(engine.embed(["a"], options))
        assert caught.value.param == field
    length = json.loads((folder / "config_sentence_transformers.json").read_text())["document_length"]
    with pytest.raises(ContextLengthExceeded):  # truncation off: a document past document_length is refused
        asyncio.run(engine.embed([long_text(length + 5)], EmbedOptions(multi_vector=True, truncate=False)))


@pytest.mark.parametrize("colbert", ["modernbert-hidden-expansion"], indirect=True)
def test_a_query_longer_than_the_local_window_with_hidden_expansion_is_refused(colbert):
    _, folder, _, _ = colbert
    config = folder / "config_sentence_transformers.json"
    saved = config.read_text()
    try:
        config.write_text(json.dumps({**json.loads(saved), "query_length": 32}))
        from embedserve.models.sentence import build_model

        with pytest.raises(ModelLoadError, match="query_length 32"):
            build_model(read_model(folder), dtype=torch.float32, device=torch.device("cpu"))
    finally:
        config.write_text(saved)

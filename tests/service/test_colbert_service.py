"""A PyLate ColBERT folder served over HTTP: /v1/embeddings' multi_vector answers (queries with is_query, documents;
floats and base64 matrices) and TEI's /embed_all against ``pylate.models.ColBERT.encode``; the rerank routes
scoring by MaxSim with the ``cohere`` clients and TEI's shape, in ``pylate.rank.rerank``'s order and scores."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import torch

from serving import run_server
from tiny import build_tiny_colbert, mixed_texts

QUERIES = ["what is a vector?", "who wrote the first search engine"]
DOCUMENTS = [t + ", the end." for t in mixed_texts(7, seed=12)]


@pytest.fixture(scope="module")
def colbert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colbert") / "tiny-colbert"
    reference = build_tiny_colbert(folder, "bert", queries=QUERIES, documents=DOCUMENTS,
                                   rerank=[(q, DOCUMENTS) for q in QUERIES], seed=9, embedding_size=16,
                                   query_length=12, document_length=48)
    with run_server(folder.parent, "--model", str(folder), "--served-model-name", "colbert", "--dtype",
                    "float32") as server:
        yield server, reference


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def close(got, want) -> None:
    got = torch.tensor(np.array(got, dtype=np.float32))
    assert got.shape == want.shape
    assert float(torch.nn.functional.cosine_similarity(got, want, dim=1).min()) >= 0.99999


def test_queries_and_documents_as_floats_and_base64_matrices(colbert):
    server, (queries, documents, _) = colbert
    r = post(server, "/v1/embeddings", {"model": "colbert", "input": QUERIES, "encoding_format": "multi_vector",
                                        "is_query": True})
    assert r.status_code == 200, r.text
    for item, want in zip(r.json()["data"], queries):
        close(item["embedding"], want)
    r = post(server, "/v1/embeddings", {"model": "colbert", "input": DOCUMENTS, "encoding_format": "multi_vector",
                                        "multi_vector_format": "base64"})
    assert r.status_code == 200, r.text
    body = r.json()
    for item, want in zip(body["data"], documents):
        matrix = item["embedding"]
        close(np.frombuffer(base64.b64decode(matrix["base64"]), dtype="<f4").reshape(matrix["shape"]), want)
    assert body["usage"]["total_tokens"] >= sum(len(d) for d in documents)
    r = post(server, "/embed_all", {"inputs": DOCUMENTS[:2]})
    assert r.status_code == 200, r.text
    for got, want in zip(r.json(), documents):
        close(got, want)


def test_one_vector_is_a_400_and_the_model_says_what_it_is(colbert):
    server, _ = colbert
    r = post(server, "/v1/embeddings", {"model": "colbert", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    r = post(server, "/v1/embeddings", {"model": "colbert", "input": "x", "encoding_format": "multi_vector",
                                        "include_dense": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_dense"
    info = httpx.get(server.url + "/info").json()
    assert info["kind"] == "multi_vector" and info["model_type"] == {"embedding": {"pooling": "colbert"}}
    assert info["dimensions"] == 16
    spec = httpx.get(server.url + "/openapi.json").json()
    described = spec["paths"]["/v1/rerank"]["post"]["description"]
    assert "colbert" in described and "wrong_model_kind" not in described  # MaxSim answers it here


def test_the_rerank_routes_score_by_maxsim_with_the_cohere_clients(colbert):
    import cohere

    server, (_, _, ranked) = colbert
    for query, want in zip(QUERIES, ranked):
        order = [i for i, _ in want]
        scores = dict(want)
        res = cohere.ClientV2(api_key="unused", base_url=server.url).rerank(
            model="colbert", query=query, documents=DOCUMENTS, top_n=4)
        assert [x.index for x in res.results] == order[:4]
        assert all(abs(x.relevance_score - scores[x.index]) <= 1e-4 for x in res.results)
        v1 = cohere.Client(api_key="unused", base_url=server.url).rerank(model="colbert", query=query,
                                                                         documents=DOCUMENTS, top_n=2)
        assert [x.index for x in v1.results] == order[:2]
        tei = post(server, "/rerank", {"query": query, "texts": DOCUMENTS, "return_text": True})
        assert tei.status_code == 200, tei.text
        assert [x["index"] for x in tei.json()] == order
        assert all(abs(x["score"] - scores[x["index"]]) <= 1e-4 for x in tei.json())

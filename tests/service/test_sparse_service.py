"""A SPLADE folder served over HTTP: TEI's /embed_sparse and /v1/embeddings' encoding_format "sparse" against
sentence-transformers' SparseEncoder, sparse_top_k, and the errors of asking a model for the other kind."""

from __future__ import annotations

import httpx
import pytest
import torch

from serving import run_server
from tiny import build_tiny_bge_m3, build_tiny_splade, flag_m3_reference

TEXTS = ["what is a sparse vector", "SPLADE expands a text into weighted vocabulary terms", "a"]


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    folder = tmp_path_factory.mktemp("splade") / "tiny-splade"
    encoder = build_tiny_splade(folder, seed=11)
    with run_server(folder.parent, "--model", str(folder), "--served-model-name", "splade") as server:
        yield server, encoder.encode(TEXTS, convert_to_tensor=True).to_dense()


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def test_tei_embed_sparse_is_sentence_transformers(splade):
    server, want = splade
    r = post(server, "/embed_sparse", {"inputs": TEXTS})
    assert r.status_code == 200, r.text
    for got, row in zip(r.json(), want):
        nonzero = row.nonzero().squeeze(1)
        assert [x["index"] for x in got] == nonzero.tolist()
        torch.testing.assert_close(torch.tensor([x["value"] for x in got]), row[nonzero], atol=1e-5, rtol=1e-5)
    one = post(server, "/embed_sparse", {"inputs": TEXTS[0], "sparse_top_k": 5}).json()[0]
    best = want[0].topk(5).indices.sort().values.tolist()
    assert [x["index"] for x in one] == best


def test_openai_route_answers_indices_and_values(splade):
    server, want = splade
    r = post(server, "/v1/embeddings", {"model": "splade", "input": TEXTS, "encoding_format": "sparse"})
    assert r.status_code == 200, r.text
    body = r.json()
    for item, row in zip(body["data"], want):
        nonzero = row.nonzero().squeeze(1)
        assert item["embedding"]["indices"] == nonzero.tolist()
        torch.testing.assert_close(torch.tensor(item["embedding"]["values"]), row[nonzero], atol=1e-5, rtol=1e-5)
    assert body["usage"]["total_tokens"] > len(TEXTS)
    top = post(server, "/v1/embeddings", {"model": "splade", "input": TEXTS[1], "encoding_format": "sparse",
                                         "sparse_top_k": 3}).json()["data"][0]["embedding"]
    assert top["indices"] == want[1].topk(3).indices.sort().values.tolist()


def test_the_wrong_kind_is_a_400_naming_it(splade, server):
    sparse_server, _ = splade
    r = post(sparse_server, "/v1/embeddings", {"model": "splade", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind" and "sparse" in r.text
    r = post(sparse_server, "/embed", {"inputs": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    r = post(server, "/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "sparse"})
    assert r.status_code == 400 and "kind 'embedding'" in r.text
    r = post(server, "/embed_sparse", {"inputs": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    r = post(sparse_server, "/v1/embeddings", {"model": "splade", "input": "x", "encoding_format": "sparse",
                                               "sparse_top_k": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sparse_top_k"


def test_openapi_lists_embed_sparse_for_a_sparse_model(splade):
    server, _ = splade
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/embed_sparse" in spec["paths"] and "/v1/embeddings" in spec["paths"]
    info = httpx.get(server.url + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "splade"}} and info["kind"] == "sparse"


@pytest.fixture(scope="module")
def bge_m3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m3") / "tiny-bge-m3"
    build_tiny_bge_m3(folder, seed=14)
    with run_server(folder.parent, "--model", str(folder), "--served-model-name", "m3") as server:
        yield server, flag_m3_reference(folder, TEXTS, colbert=True)


def test_bge_m3_dense_and_lexical_weights_in_one_request(bge_m3):
    server, (dense, lexical, _) = bge_m3
    r = post(server, "/v1/embeddings", {"model": "m3", "input": TEXTS, "encoding_format": "sparse",
                                        "include_dense": True})
    assert r.status_code == 200, r.text
    for item, vector, weights in zip(r.json()["data"], dense, lexical):
        got = item["embedding"]
        assert set(got) == {"dense", "indices", "values"}
        torch.testing.assert_close(torch.tensor(got["dense"]), vector, atol=1e-5, rtol=1e-4)
        assert got["indices"] == sorted(int(k) for k in weights)
        torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor([float(weights[str(i)])
                                                                              for i in got["indices"]]))
    sparse = post(server, "/v1/embeddings", {"model": "m3", "input": TEXTS, "encoding_format": "sparse"}).json()
    assert [set(item["embedding"]) for item in sparse["data"]] == [{"indices", "values"}] * len(TEXTS)
    tei = post(server, "/embed_sparse", {"inputs": TEXTS}).json()
    assert [[x["index"] for x in row] for row in tei] == [item["embedding"]["indices"] for item in sparse["data"]]
    plain = post(server, "/v1/embeddings", {"model": "m3", "input": TEXTS}).json()
    torch.testing.assert_close(torch.tensor([item["embedding"] for item in plain["data"]]), dense, atol=1e-5,
                               rtol=1e-4)
    r = post(server, "/v1/embeddings", {"model": "m3", "input": "x", "include_dense": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include_dense"
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "include_dense" in spec["components"]["schemas"]["EmbeddingRequest"]["properties"]
    assert "wrong_model_kind" not in spec["paths"]["/embed_sparse"]["post"]["description"]


def test_bge_m3_colbert_vectors_and_all_three_outputs_over_http(bge_m3, server):
    m3, (dense, lexical, colbert) = bge_m3
    r = post(m3, "/v1/embeddings", {"model": "m3", "input": TEXTS, "encoding_format": "multi_vector"})
    assert r.status_code == 200, r.text
    for item, want in zip(r.json()["data"], colbert):
        torch.testing.assert_close(torch.tensor(item["embedding"]), want, atol=1e-5, rtol=1e-4)
    r = post(m3, "/v1/embeddings", {"model": "m3", "input": TEXTS, "encoding_format": "multi_vector",
                                    "include_dense": True, "include_sparse": True})
    assert r.status_code == 200, r.text
    for item, vectors, vector, weights in zip(r.json()["data"], colbert, dense, lexical):
        got = item["embedding"]
        assert set(got) == {"multi_vector", "dense", "indices", "values"}
        torch.testing.assert_close(torch.tensor(got["multi_vector"]), vectors, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(got["dense"]), vector, atol=1e-5, rtol=1e-4)
        assert got["indices"] == sorted(int(k) for k in weights)
    r = post(server, "/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "multi_vector"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"


def test_bge_m3_vectors_as_base64_matrices_and_teis_embed_all(bge_m3):
    import base64

    import numpy as np

    m3, (_, _, colbert) = bge_m3
    r = post(m3, "/v1/embeddings", {"model": "m3", "input": TEXTS, "encoding_format": "multi_vector",
                                    "multi_vector_format": "base64", "include_dense": True})
    assert r.status_code == 200, r.text
    for item, want in zip(r.json()["data"], colbert):
        matrix = item["embedding"]["multi_vector"]
        assert matrix["shape"] == list(want.shape)
        got = np.frombuffer(base64.b64decode(matrix["base64"]), dtype="<f4").reshape(matrix["shape"])
        torch.testing.assert_close(torch.from_numpy(got.copy()), want, atol=1e-5, rtol=1e-4)
        assert len(item["embedding"]["dense"]) == 36
    tei = post(m3, "/embed_all", {"inputs": TEXTS})
    assert tei.status_code == 200, tei.text
    for got, want in zip(tei.json(), colbert):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-5, rtol=1e-4)
    r = post(m3, "/v1/embeddings", {"model": "m3", "input": "x", "encoding_format": "multi_vector",
                                    "multi_vector_format": "hex"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "multi_vector_format"

"""Late chunking over HTTP (the vectors themselves are checked against transformers in
tests/models/test_late_chunking.py): the fields on /v1/embeddings and TEI's /embed, usage, their errors and the
OpenAPI document."""

from __future__ import annotations

import httpx
import numpy as np
from transformers import AutoTokenizer

CHUNKS = ["Berlin is the capital of Germany.", " It has about 3.8 million inhabitants.", " Its museums are famous."]


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def test_openai_and_tei_routes_give_one_vector_per_chunk_and_count_the_document(server, minilm_dir, st_embed):
    r = post(server, "/v1/embeddings", {"model": "m", "input": CHUNKS, "late_chunking": True})
    assert r.status_code == 200, r.text
    body = r.json()
    late = np.array([d["embedding"] for d in body["data"]])
    assert late.shape == (3, 384) and np.allclose(np.linalg.norm(late, axis=1), 1, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    document = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in CHUNKS) + 2  # [CLS] ... [SEP]
    assert body["usage"]["total_tokens"] == document
    tei = np.array(post(server, "/embed", {"inputs": CHUNKS, "late_chunking": True}).json())
    np.testing.assert_allclose(tei, late, atol=1e-6)
    alone = st_embed(CHUNKS)
    assert (np.sum(alone * late, axis=1) < 0.999).all()  # each chunk sees the others
    b64 = post(server, "/v1/embeddings", {"model": "m", "input": CHUNKS, "late_chunking": True,
                                          "encoding_format": "base64", "dimensions": 64})
    assert b64.status_code == 200 and len(b64.json()["data"]) == 3


def test_errors_name_their_field(server):
    for body, param in (({"late_chunking": "yes"}, "late_chunking"),
                        ({"late_chunking": True, "late_chunking_overlap": -1}, "late_chunking_overlap"),
                        ({"late_chunking": True, "late_chunking_overlap": 254}, "late_chunking_overlap")):
        r = post(server, "/v1/embeddings", {"model": "m", "input": CHUNKS + [" more " * 300], **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)
    r = post(server, "/v1/embeddings", {"model": "m", "input": [[101, 2023], [2003, 102]], "late_chunking": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "late_chunking"
    r = post(server, "/embed", {"inputs": CHUNKS, "late_chunking": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "late_chunking"
    for route, body in (("/v1/embeddings", {"model": "m", "input": "x"}), ("/embed", {"inputs": "x"})):
        r = post(server, route, {**body, "long_input": "average"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "long_input", r.text
    # ids are checked before long_input mean reads them (schemathesis found a 500 here once)
    r = post(server, "/v1/embeddings", {"model": "m", "input": [[645, 295.0], [351]], "long_input": "mean"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text


def test_long_input_over_http(server):
    long = " ".join(["alpha beta gamma delta"] * 200)  # about 800 tokens: four windows of 254
    shapes = (("/v1/embeddings", {"model": "m", "input": ["short", long]}), ("/embed", {"inputs": ["short", long]}))
    for route, body in shapes:
        mean = post(server, route, {**body, "long_input": "mean"})
        cut = post(server, route, body)
        assert mean.status_code == 200 and cut.status_code == 200
        pick = (lambda r: [d["embedding"] for d in r.json()["data"]]) if route == "/v1/embeddings" else (
            lambda r: r.json())
        np.testing.assert_allclose(pick(mean)[0], pick(cut)[0], atol=1e-6)
        assert not np.allclose(pick(mean)[1], pick(cut)[1], atol=1e-3)
        if route == "/v1/embeddings":
            assert mean.json()["usage"]["total_tokens"] > cut.json()["usage"]["total_tokens"] + 500
        error = post(server, route, {**body, "long_input": "error"})
        assert error.status_code == 400, error.text


def test_the_openapi_document_shows_the_fields(server):
    spec = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    for name in ("EmbeddingRequest", "TeiEmbedRequest"):
        assert {"late_chunking", "late_chunking_overlap", "long_input"} <= set(spec[name]["properties"]), name

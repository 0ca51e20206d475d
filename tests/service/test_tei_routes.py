"""TEI's native routes on real server processes, driven by the clients teams migrating from TEI use:
huggingface_hub's InferenceClient (feature_extraction), LlamaIndex's TEI embeddings and TEI reranker; Cohere's
rerank through the `cohere` client and langchain-cohere; plus raw HTTP for what no client covers, and errors."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from serving import DEVICE, cross_encoder_server, run_server
from tiny import mixed_texts

TEXTS = ["The cat sits on the mat.", "A feline rests.", "Stock markets fell sharply today."]
QUERY = "what is a search query"
DOCS = mixed_texts(10, seed=31)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    with cross_encoder_server(tmp_path_factory.mktemp("nli"), "bert", "tiny-nli", num_labels=3, seed=5,
                              id2label={0: "contradiction", 1: "entailment", 2: "neutral"}) as served:
        yield served


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    with cross_encoder_server(tmp_path_factory.mktemp("tei-reranker"), "xlm-roberta", "tiny-reranker",
                              seed=6) as served:
        yield served


def post(server, route, body):
    return httpx.post(server.url + route, json=body, timeout=30)


def test_huggingface_hub_inference_client_feature_extraction(server, st_embed):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    got = client.feature_extraction(TEXTS[0])
    np.testing.assert_allclose(np.asarray(got).reshape(-1), st_embed([TEXTS[0]])[0], atol=2e-5)


def test_llamaindex_tei_embeddings(server, st_embed):
    from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

    emb = TextEmbeddingsInference(base_url=server.url, model_name="all-MiniLM-L6-v2", embed_batch_size=2)
    got = np.asarray(emb.get_text_embedding_batch(TEXTS))
    np.testing.assert_allclose(got, st_embed(TEXTS), atol=2e-5)


def test_embed_route_options(server, st_embed):
    r = post(server, "/embed", {"inputs": TEXTS, "dimensions": 8, "normalize": True})
    got = np.asarray(r.json())
    want = st_embed(TEXTS)[:, :8]
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=2e-5)
    r = post(server, "/embed", {"inputs": "x", "truncation_direction": "Middle"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncation_direction"
    # Left cuts an over-long input's start: what Cohere's truncate START gives (tested against transformers there)
    long = " ".join(["alpha beta gamma"] * 200) + " omega"
    left = post(server, "/embed", {"inputs": long, "truncation_direction": "Left"}).json()[0]
    start = post(server, "/v2/embed", {"texts": [long], "truncate": "START"}).json()["embeddings"]["float"][0]
    right = post(server, "/embed", {"inputs": long}).json()[0]
    np.testing.assert_allclose(left, start, atol=1e-6)
    assert not np.allclose(left, right, atol=1e-3)
    for bad in ({}, {"inputs": []}, {"inputs": [1, 2]}, {"inputs": "x", "dimensions": 0}):
        r = post(server, "/embed", bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)


def test_tokenize_and_decode_round_trip(server):
    from transformers import AutoTokenizer

    from tiny import MINILM_DIR

    tok = AutoTokenizer.from_pretrained(str(MINILM_DIR))
    rows = post(server, "/tokenize", {"inputs": TEXTS[:2]}).json()
    for text, row in zip(TEXTS, rows):
        assert [t["id"] for t in row] == tok(text)["input_ids"]
        assert row[0]["special"] and row[0]["start"] is None
        for t in row[1:-1]:
            assert not t["special"] and text[t["start"]:t["stop"]].lower() == t["text"].lower()
    plain = post(server, "/tokenize", {"inputs": TEXTS[0], "add_special_tokens": False}).json()[0]
    assert [t["id"] for t in plain] == tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    ids = [t["id"] for t in rows[0]]
    assert post(server, "/decode", {"ids": ids}).json() == [tok.decode(ids, skip_special_tokens=True)]
    assert post(server, "/decode", {"ids": [ids, ids[:3]], "skip_special_tokens": False}).json() == [
        tok.decode(ids), tok.decode(ids[:3])]
    for bad in ({"ids": []}, {"ids": [-1]}, {"ids": [[1, "a"]]}, {"ids": [10**9]}):
        r = post(server, "/decode", bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "ids", (bad, r.text)


def test_info_describes_each_kind(server, reranker, classifier):
    info = httpx.get(server.url + "/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 256
    assert info["kind"] == "embedding" and info["model_dtype"] == "float32" and info["dimensions"] == 384
    assert info["quantize"] == "none"
    assert httpx.get(reranker[0].url + "/info").json()["model_type"]["reranker"]["id2label"] == {"0": "LABEL_0"}
    nli = httpx.get(classifier[0].url + "/info").json()["model_type"]["classifier"]
    assert nli["label2id"] == {"contradiction": 0, "entailment": 1, "neutral": 2}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="--quantize int8 runs on the CPU")
def test_an_int8_server_says_so_and_serves_close_vectors(tmp_path, st_embed):
    """--quantize int8 end to end: the flag reaches the engine, /info reports it, the vectors stay within 0.99."""
    with run_server(tmp_path, "--quantize", "int8") as int8:
        info = httpx.get(int8.url + "/info").json()
        assert info["quantize"] == "int8" and info["model_dtype"] == "float32"
        got = np.asarray(post(int8, "/embed", {"inputs": TEXTS + DOCS}).json())
        assert "linear layers quantized" in int8.output()
    want = st_embed(TEXTS + DOCS)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99, cos


def test_predict_and_classify_on_pairs_and_texts(classifier):
    server, ce = classifier
    pairs = [(QUERY, d) for d in DOCS[:4]]
    want = torch.softmax(torch.tensor(ce.predict(pairs)), dim=1)  # TEI's scores: softmax over several labels
    for route in ("/predict", "/classify"):
        got = post(server, route, {"inputs": [list(p) for p in pairs]}).json()
        assert len(got) == len(pairs)
        for row, w in zip(got, want):
            assert [p["label"] for p in row] == [("contradiction", "entailment", "neutral")[i]
                                                 for i in w.argsort(descending=True).tolist()]
            for p in row:
                label = ("contradiction", "entailment", "neutral").index(p["label"])
                assert abs(p["score"] - w[label].item()) <= 1e-5
    one = post(server, "/predict", {"inputs": list(pairs[0]), "raw_scores": True, "top_k": 1}).json()
    logits = torch.tensor(ce.predict([pairs[0]]))[0]
    assert len(one) == 1 and abs(one[0]["score"] - logits.max().item()) <= 1e-4
    single = post(server, "/", {"inputs": "just one text"}).json()  # TEI's root route: predict for a classifier
    assert len(single) == 3 and abs(sum(p["score"] for p in single) - 1) < 1e-5
    for bad in ({"inputs": []}, {"inputs": [["a", "b", "c"]]}, {"inputs": 5}, {"inputs": "x", "top_k": 0}):
        r = post(server, "/predict", bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (bad, r.text)


def test_routes_of_another_kind_are_400s_that_say_the_kind(server, reranker):
    r = post(server, "/predict", {"inputs": "x"})
    assert r.status_code == 400 and "the served model is an embedding model" in r.json()["error"]["message"]
    r = post(reranker[0], "/embed", {"inputs": "x"})
    assert r.status_code == 400 and "the served model is a reranker" in r.json()["error"]["message"]


def test_llamaindex_tei_reranker(reranker):
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    server, ce = reranker
    nodes = [NodeWithScore(node=TextNode(text=d), score=0.0) for d in DOCS]
    ranked = TextEmbeddingInference(base_url=server.url, top_n=3).postprocess_nodes(nodes, QueryBundle(QUERY))
    want = ce.predict([(QUERY, d) for d in DOCS])
    assert [n.node.text for n in ranked] == [DOCS[i] for i in np.argsort(-want)[:3]]
    assert all(abs(n.score - want[DOCS.index(n.node.text)]) <= 1e-5 for n in ranked)


def test_cohere_client_and_langchain_cohere_rerank(reranker):
    import cohere
    from langchain_cohere import CohereRerank

    server, ce = reranker
    want = ce.predict([(QUERY, d) for d in DOCS])
    order = list(np.argsort(-want))
    co = cohere.ClientV2(api_key="unused", base_url=server.url)
    res = co.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, top_n=4)
    assert [r.index for r in res.results] == order[:4]
    assert all(abs(r.relevance_score - want[r.index]) <= 1e-5 for r in res.results)
    v1 = cohere.Client(api_key="unused", base_url=server.url).rerank(model="tiny-reranker", query=QUERY,
                                                                     documents=DOCS, top_n=2)
    assert [r.index for r in v1.results] == order[:2]
    lc = CohereRerank(model="tiny-reranker", cohere_api_key="unused", base_url=server.url, top_n=3)
    got = lc.rerank(DOCS, QUERY)
    assert [d["index"] for d in got] == order[:3]

"""The rerank routes against a real server process serving a tiny cross-encoder, with raw HTTP: Cohere / Jina's
shape on /v1/rerank, /v2/rerank and /rerank, TEI's shape on /rerank, and each route's errors."""

from __future__ import annotations

import httpx
import pytest
import torch

from serving import cross_encoder_server, run_server
from tiny import long_text, mixed_texts

QUERY = "what is a search query"
DOCS = mixed_texts(12, seed=21) + [long_text(800, seed=3)]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    with cross_encoder_server(tmp_path_factory.mktemp("reranker"), "bert", "tiny-reranker", seed=8) as served:
        yield served


def post(server, route: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=30, **kw)


@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_cohere_and_jina_shape_sorted_by_score_with_top_n_and_documents(reranker, route):
    server, ce = reranker
    want = torch.tensor(ce.predict([(QUERY, d) for d in DOCS]))
    docs = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]  # Jina's and Cohere's object form too
    r = post(server, route, {"model": "tiny-reranker", "query": QUERY, "documents": docs, "top_n": 5,
                             "return_documents": True})
    assert r.status_code == 200, r.text
    body = r.json()
    order = want.argsort(descending=True)[:5].tolist()
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert abs(x["relevance_score"] - want[x["index"]].item()) <= 1e-5
        assert x["document"] == {"text": DOCS[x["index"]]}
    assert body["model"] == "tiny-reranker" and body["usage"]["total_tokens"] > len(DOCS)
    assert body["meta"]["billed_units"]["search_units"] == 1
    plain = post(server, route, {"query": QUERY, "documents": DOCS}).json()
    assert len(plain["results"]) == len(DOCS) and "document" not in plain["results"][0]


def test_tei_shape_on_rerank_with_raw_scores_and_text(reranker):
    server, ce = reranker
    logits = torch.tensor(ce.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity()))
    r = post(server, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True})
    assert r.status_code == 200, r.text
    ranks = r.json()
    assert [x["index"] for x in ranks] == logits.argsort(descending=True).tolist()
    for x in ranks:
        # Raw logits (before the sigmoid, whose scores are held to 1e-5 above): fp32 rounding through the
        # fixture's rescaled head reaches about 1e-5 of their size.
        want = logits[x["index"]].item()
        assert abs(x["score"] - want) <= 3e-5 * max(1.0, abs(want)) and x["text"] == DOCS[x["index"]]
    scored = post(server, "/rerank", {"query": QUERY, "texts": DOCS}).json()
    assert all(0 < x["score"] < 1 and "text" not in x for x in scored)  # sigmoid, as the folder declares


def test_max_tokens_per_doc_cuts_each_document(reranker):
    server, ce = reranker
    cut = ce.tokenizer.decode(ce.tokenizer(DOCS[-1], add_special_tokens=False)["input_ids"][:10])
    want = float(ce.predict([(QUERY, cut)])[0])
    r = post(server, "/v1/rerank", {"query": QUERY, "documents": [DOCS[-1]], "max_tokens_per_doc": 10})
    assert abs(r.json()["results"][0]["relevance_score"] - want) <= 1e-5


@pytest.mark.parametrize("body, param", [
    ({"documents": ["a"]}, "query"),
    ({"query": 3, "documents": ["a"]}, "query"),
    ({"query": "q"}, "documents"),
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q", "documents": [{"title": "no text"}]}, "documents"),
    ({"query": "q", "documents": ["a", 5]}, "documents"),
    ({"query": "q", "texts": [{"text": "TEI takes strings only"}]}, "texts"),
    ({"query": "q", "documents": ["a"], "texts": ["a"]}, "documents"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc"),
    ({"query": "q", "documents": ["a"], "top_n": "two"}, "top_n"),
])
def test_bad_rerank_requests_are_openai_shaped_400s_naming_the_field(reranker, body, param):
    server, _ = reranker
    r = post(server, "/v1/rerank", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def test_too_long_without_truncation_and_embeddings_from_a_reranker_are_400s(reranker):
    server, _ = reranker
    r = post(server, "/rerank", {"query": QUERY, "texts": [DOCS[-1]], "truncate": False})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = post(server, "/v1/embeddings", {"model": "tiny-reranker", "input": "hello"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "wrong_model_kind"
    assert "the served model is a reranker" in r.json()["error"]["message"]


def test_rerank_on_an_embedding_model_is_a_400_saying_what_the_model_is(server):
    r = post(server, "/v1/rerank", {"query": "q", "documents": ["a", "b"]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "wrong_model_kind" and "the served model is an embedding model" in err["message"]


def test_a_causal_lm_served_with_kind_rerank_answers_the_rerank_route(tmp_path):
    """`--kind rerank` on a Qwen3 causal LM (Qwen3-Reranker): the rerank route ranks by its yes / no score."""
    from tiny import QWEN3_RERANKER_PROMPT, build_tiny_qwen3_reranker

    path = tmp_path / "qwen3-reranker"
    model = build_tiny_qwen3_reranker(path)
    from transformers import AutoTokenizer

    prefix_text, suffix_text, instruction = QWEN3_RERANKER_PROMPT
    tok = AutoTokenizer.from_pretrained(str(path))
    prefix, suffix = tok.encode(prefix_text, add_special_tokens=False), tok.encode(suffix_text, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    docs = DOCS[:8]
    with torch.no_grad():
        want = []
        for d in docs:
            # The model's 1,024 positions (build_tiny_qwen3_reranker) hold prefix, suffix and what fits of the middle.
            middle = tok(f"<Instruct>: {instruction}\n<Query>: {QUERY}\n<Document>: {d}", truncation=True,
                         max_length=1024 - len(prefix) - len(suffix))["input_ids"]
            logits = model(input_ids=torch.tensor([prefix + middle + suffix])).logits[0, -1]
            want.append(torch.softmax(logits[[no, yes]], dim=0)[1].item())
    with run_server(tmp_path, "--model", str(path), "--kind", "rerank") as server:
        body = post(server, "/v1/rerank", {"query": QUERY, "documents": docs}).json()
        assert httpx.get(server.url + "/info").json()["kind"] == "rerank"
    assert [x["index"] for x in body["results"]] == sorted(range(len(docs)), key=lambda i: -want[i])
    assert all(abs(x["relevance_score"] - want[x["index"]]) <= 1e-5 for x in body["results"])


def test_a_sentence_transformers_logit_score_folder_is_a_reranker_by_itself(tmp_path):
    """A sentence-transformers 6 CrossEncoder folder of a causal LM (chat template + LogitScore) needs no --kind:
    the rerank route answers CrossEncoder.predict's scores."""
    from sentence_transformers import CrossEncoder

    from tiny import build_tiny_logit_score_reranker

    path = tmp_path / "st-reranker"
    build_tiny_logit_score_reranker(path)
    docs = DOCS[:8]
    want = CrossEncoder(str(path), device="cpu").predict([(QUERY, d) for d in docs]).tolist()
    with run_server(tmp_path, "--model", str(path)) as server:
        body = post(server, "/v1/rerank", {"query": QUERY, "documents": docs}).json()
        assert httpx.get(server.url + "/info").json()["kind"] == "rerank"
    assert [x["index"] for x in body["results"]] == sorted(range(len(docs)), key=lambda i: -want[i])
    assert all(abs(x["relevance_score"] - want[x["index"]]) <= 1e-5 for x in body["results"])


def test_metrics_and_the_access_log_carry_the_route_and_the_kind(reranker):
    server, _ = reranker
    post(server, "/v1/rerank", {"query": QUERY, "documents": DOCS[:2]})
    text = httpx.get(server.url + "/metrics").text
    assert 'embedserve_model_info{kind="rerank",model="tiny-reranker"} 1.0' in text
    assert 'embedserve_requests_total{route="/v1/rerank",status="200"}' in text
    assert "POST /v1/rerank 200 kind=rerank model=tiny-reranker inputs=2" in server.output()

"""An attacker with a valid key, against a real server on 127.0.0.1 (issue 24): what a request costs is bounded
by what the model takes, bad bodies are 4xx, and nothing the client sends comes back unbounded.

Peak memory is the server process's own high-water mark (VmHWM in /proc/<pid>/status), read before and after
each request: each request may raise it by a bounded amount, whatever its size. Times are reported by
benchmarks/bench_hostile.py, never asserted here."""

from __future__ import annotations

import threading

import httpx
import pytest

from serving import cross_encoder_server, run_server

KEY = {"Authorization": "Bearer k-hostile"}
WORDS = "the quick brown fox jumps over a lazy dog while embeddings of long texts stay exact".split()
POST_ROUTES = ["/v1/embeddings", "/embeddings", "/embed", "/tokenize", "/decode", "/v1/rerank", "/v2/rerank",
               "/rerank", "/predict", "/classify", "/"]


def text_of(chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = WORDS[len(out) % len(WORDS)]
        out.append(w)
        n += len(w) + 1
    return " ".join(out)[:chars]


def peak_kb(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def grows(server, fn) -> tuple[object, float]:
    """(fn's result, how many MB it raised the server's peak memory by), /health polled all along."""
    before, health, done, polling = peak_kb(server), [], threading.Event(), threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as c:
            while not done.is_set():
                health.append(c.get(server.url + "/health").status_code)
                polling.set()
                done.wait(0.05)

    t = threading.Thread(target=poll)
    t.start()
    # The poller answers once before fn starts: a fast fn must not finish before the first poll (seen under load).
    polling.wait(30)
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    assert health and set(health) == {200}, health  # the server kept answering meanwhile
    return result, (peak_kb(server) - before) / 1024


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("hostile"), "--api-key", "k-hostile") as s:
        r = httpx.post(s.url + "/v1/embeddings", json={"input": [text_of(3000)] * 8, "model": "m"}, headers=KEY,
                       timeout=60)
        assert r.status_code == 200  # warm: the steps a real request runs have run
        yield s


def test_one_8_mb_text_costs_what_256_tokens_cost(guarded):
    text = text_of(8 * 1024 * 1024)
    r, mb = grows(guarded, lambda: httpx.post(guarded.url + "/v1/embeddings", json={"input": text, "model": "m"},
                                               headers=KEY, timeout=120))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 256
    short = httpx.post(guarded.url + "/v1/embeddings", json={"input": text[:20_000], "model": "m"}, headers=KEY,
                       timeout=60).json()
    assert r.json()["data"][0]["embedding"] == short["data"][0]["embedding"]  # the same first 256 tokens
    assert mb < 150, f"an 8 MB text raised the peak by {mb:.0f} MB"
    r, mb = grows(guarded, lambda: httpx.post(guarded.url + "/v1/embeddings", headers=KEY, timeout=120,
                                               json={"input": text, "model": "m", "truncate": False}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "at least" in r.json()["error"]["message"] and mb < 150


def test_tokenize_of_2_mb_is_refused_as_an_over_long_input_not_answered_in_70_mb(guarded):
    text = text_of(2 * 1024 * 1024)
    r, mb = grows(guarded, lambda: httpx.post(guarded.url + "/tokenize", json={"inputs": text}, headers=KEY,
                                               timeout=120))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert len(r.content) < 1000 and mb < 100
    ok = httpx.post(guarded.url + "/tokenize", json={"inputs": ["a fox"]}, headers=KEY, timeout=30)
    assert [t["text"] for t in ok.json()[0]] == ["[CLS]", "a", "fox", "[SEP]"]
    r = httpx.post(guarded.url + "/decode", json={"ids": [1037] * 5000}, headers=KEY, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("route", POST_ROUTES)
def test_a_body_nested_5000_deep_is_a_400_on_every_post_route(guarded, route):
    body = '{"input":' + "[" * 5000 + "]" * 5000 + ',"inputs":"a","query":"q","documents":["d"],"ids":[1]}'
    r = httpx.post(guarded.url + route, content=body, headers={**KEY, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, (route, r.status_code, r.text[:200])
    assert "levels deep" in r.json()["error"]["message"]
    assert "RecursionError" not in guarded.output()


def test_error_messages_echo_a_client_value_only_so_far(guarded):
    long = "p" * 1_000_000
    for extra in ({"prompt_name": long}, {"encoding_format": long}, {"model": long}):
        r = httpx.post(guarded.url + "/v1/embeddings", json={"input": "a", "model": "m", **extra}, headers=KEY,
                       timeout=30)
        assert r.status_code in (200, 400, 404), r.status_code
        assert "p" * 100 not in r.text, (list(extra), len(r.content))  # quoted at most 64 characters of it
        if r.status_code != 200:
            assert len(r.content) < 1000


def test_one_list_of_3000_token_ids_is_one_input(guarded):
    ids = [279] * 3000  # cl100k's " the" (the server reads OpenAI's ids by default): 3000 tokens of text
    r = httpx.post(guarded.url + "/v1/embeddings", json={"input": ids, "model": "m", "encoding_format": "float"},
                   headers={**KEY}, timeout=60)
    assert r.status_code == 200 and len(r.json()["data"]) == 1 and r.json()["usage"]["total_tokens"] == 256
    nested = httpx.post(guarded.url + "/v1/embeddings", json={"input": [ids], "model": "m", "encoding_format": "float"},
                        headers=KEY, timeout=60)
    assert nested.json()["data"][0]["embedding"] == r.json()["data"][0]["embedding"]
    r = httpx.post(guarded.url + "/v1/embeddings", json={"input": ids, "model": "m", "truncate": False},
                   headers=KEY, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_a_50_kb_query_with_200_documents_costs_the_documents_not_200_queries(tmp_path):
    with cross_encoder_server(tmp_path / "ce", "bert", "ce") as (server, ce):
        query = text_of(50_000)
        docs = [f"document {i} about a lazy dog" for i in range(200)]
        r, mb = grows(server, lambda: httpx.post(server.url + "/v1/rerank", timeout=120,
                                                  json={"query": query, "documents": docs, "model": "ce"}))
        assert r.status_code == 200 and len(r.json()["results"]) == 200
        assert mb < 100, f"the rerank raised the peak by {mb:.0f} MB"
        # The scores are transformers' over the whole texts, cut as it cuts a pair.
        want = ce.predict([(query, d) for d in docs[:5]])
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert all(abs(got[i] - float(w)) <= 1e-5 for i, w in enumerate(want))

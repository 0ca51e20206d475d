"""The service end to end on a tiny Qwen3 embedding folder (last-token pooling, prompts, Normalize)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import openai
import pytest

from serving import run_server
from tiny import build_tiny_decoder, mixed_texts

PROMPTS = {"query": "Instruct: Given a web search query, retrieve relevant passages\nQuery: "}


@pytest.fixture(scope="module")
def decoder_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-folder")
    build_tiny_decoder(path, "qwen3", pooling="last", normalize=True, seed=21)
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    with run_server(tmp_path_factory.mktemp("logs"), "--model", str(path), "--served-model-name", "tiny-qwen3") as s:
        yield path, s


@pytest.fixture(scope="module")
def st(decoder_server):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(decoder_server[0]), device="cpu")


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_client_base64_float_and_prompt_name(decoder_server, st):
    _, server = decoder_server
    texts = mixed_texts(12, seed=2) + [""]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    res = client.embeddings.create(input=texts, model="anything")  # base64 on the wire
    assert res.model == "tiny-qwen3" and len(res.data[0].embedding) == 40
    got = np.array([d.embedding for d in res.data])
    assert cosine(got, st.encode(texts)).min() >= 0.9999
    q = client.embeddings.create(input=texts, model="m", encoding_format="float", extra_body={"prompt_name": "query"})
    assert cosine([d.embedding for d in q.data], st.encode(texts, prompt_name="query")).min() >= 0.9999
    usage_plain = res.usage.prompt_tokens
    assert q.usage.prompt_tokens > usage_plain  # prompt tokens are embedded and counted


def test_contract_cases_on_a_decoder(decoder_server, st):
    _, server = decoder_server
    post = lambda body: httpx.post(server.url + "/v1/embeddings", json={"model": "m", **body}, timeout=60)  # noqa
    texts = mixed_texts(40, seed=3)
    batch = np.array([d["embedding"] for d in post({"input": texts}).json()["data"]])
    for i in (0, 39):  # case 10
        alone = np.array(post({"input": texts[i]}).json()["data"][0]["embedding"])
        assert np.abs(alone - batch[i]).max() <= 1e-5
    cut = np.array([d["embedding"] for d in post({"input": texts[:3], "dimensions": 16}).json()["data"]])
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-5)  # case 9
    r = post({"input": ["x"], "prompt_name": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_name"
    assert "query" in r.json()["error"]["message"]
    assert post({"input": [[]]}).status_code == 400  # case 7


def test_langchain_default_on_a_decoder(decoder_server, st):
    from langchain_openai import OpenAIEmbeddings

    _, server = decoder_server
    lc = OpenAIEmbeddings(base_url=server.url + "/v1", api_key="x", model="text-embedding-3-small")
    texts = ["token ids from tiktoken", "decoded back to text"]
    assert cosine(lc.embed_documents(texts), st.encode(texts)).min() >= 0.999

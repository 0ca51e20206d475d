"""Every numbered case of shared/openai-contract.md against a real server and the real clients: one serving the
packaged model folder, and one started from a Hub id (all-MiniLM-L6-v2 downloaded from a fake Hub on 127.0.0.1).

Vectors are compared with sentence-transformers on the same texts (cosine >= 0.9999).
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from conftest import MINILM_REPO, hub_env
from serving import run_server

D = 384


@pytest.fixture(scope="module", params=["model folder", "hub id"])
def server(request, server, minilm_hub, tmp_path_factory):
    """The cases that share a server run against both ways of naming the model."""
    if request.param == "model folder":
        yield server
        return
    tmp = tmp_path_factory.mktemp("hub-server")
    with run_server(tmp, "--model", MINILM_REPO, "--served-model-name", "all-MiniLM-L6-v2",
                    env=hub_env(minilm_hub, tmp / "hf-home")) as s:
        assert "downloading sentence-transformers/all-MiniLM-L6-v2 (revision main)" in s.output()
        yield s
TEXTS = ["The cat sits on the mat.", "Embeddings map text to vectors.", "", "Ünïcödé テスト 🙂", "a"]


def cosine(a, b) -> np.ndarray:
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def post(server, body, **kw) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=60, **kw)


def vectors(response: httpx.Response) -> np.ndarray:
    data = response.json()["data"]
    return np.array([d["embedding"] for d in data], dtype=np.float64)


def assert_error(r: httpx.Response, status: int, param: str | None = "__any__", type_: str | None = None):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "__any__":
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_
    assert "Traceback" not in err["message"] and "/site-packages/" not in err["message"]
    return err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-anything", max_retries=0)


def test_case_1_string_gives_one_item_and_list_keeps_order(server, st_embed):
    r = post(server, {"input": "hello there", "model": "m"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert len(data) == 1 and data[0]["index"] == 0 and data[0]["object"] == "embedding"
    assert r.json()["object"] == "list"

    r = post(server, {"input": TEXTS, "model": "m"})
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(TEXTS)))
    assert cosine(vectors(r), st_embed(TEXTS)).min() >= 0.9999

    # A big answer (200 x 384 floats) is encoded off the event loop; same shape, same order.
    many = [f"sentence number {i} " + "x" * (i % 7) for i in range(200)]
    for fmt in ("float", "base64"):
        r = post(server, {"input": many, "model": "m", "encoding_format": fmt})
        data = r.json()["data"]
        assert [d["index"] for d in data] == list(range(200))
    got = vectors(post(server, {"input": many, "model": "m"}))
    assert cosine(got, st_embed(many)).min() >= 0.9999


def test_case_2_usage_counts_the_tokens_embedded(server, st_model):
    texts = ["hello world", "word " * 1000]
    r = post(server, {"input": texts, "model": "m"})
    usage = r.json()["usage"]
    tok = st_model.tokenizer
    expected = sum(len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
    assert usage == {"prompt_tokens": expected, "total_tokens": expected}
    assert expected == 4 + 256


def test_case_3_base64_is_little_endian_float32(server):
    f = post(server, {"input": TEXTS, "model": "m", "encoding_format": "float"}).json()
    b = post(server, {"input": TEXTS, "model": "m", "encoding_format": "base64"}).json()
    for fi, bi in zip(f["data"], b["data"]):
        raw = base64.b64decode(bi["embedding"], validate=True)
        assert len(raw) == 4 * D
        np.testing.assert_allclose(np.frombuffer(raw, "<f4"), fi["embedding"], atol=1e-6)
        # And byte-for-byte what Python's own base64 makes of the float answer.
        assert bi["embedding"] == base64.b64encode(np.asarray(fi["embedding"], "<f4").tobytes()).decode()


def test_case_4_openai_client_default_call_gets_float_lists(client, st_embed):
    res = client.embeddings.create(input=TEXTS, model="text-embedding-ada-002")  # sends base64
    got = [d.embedding for d in res.data]
    assert all(isinstance(v, list) and len(v) == D and isinstance(v[0], float) for v in got)
    assert cosine(got, st_embed(TEXTS)).min() >= 0.9999
    assert res.model == "all-MiniLM-L6-v2"
    res_f = client.embeddings.create(input=TEXTS, model="x", encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in res_f.data]), np.array(got), atol=1e-6)


def test_case_5_langchain_default_sends_cl100k_ids_and_gets_the_text_embedding(server, st_embed):
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(base_url=server.url + "/v1", api_key="sk-x", model="text-embedding-3-small")
    assert lc.check_embedding_ctx_length  # the default mode: tiktoken cl100k ids, base64
    texts = ["LangChain sends token ids by default.", "Ünïcödé テスト 🙂", "short"]
    got = lc.embed_documents(texts)
    assert cosine(got, st_embed(texts)).min() >= 0.999
    assert cosine(lc.embed_query(texts[0]), st_embed(texts[:1])).min() >= 0.999


def test_case_5_cl100k_ids_by_hand_and_an_id_outside_the_vocabulary(server, st_embed):
    import tiktoken

    enc = tiktoken.get_encoding("cl100k_base")
    text = "The server reads token ids as cl100k by default."
    r = post(server, {"input": [enc.encode(text)], "model": "m"})
    assert cosine(vectors(r), st_embed([text])).min() >= 0.999
    r = post(server, {"input": enc.encode(text), "model": "m"})  # a flat list[int] is one input
    assert cosine(vectors(r), st_embed([text])).min() >= 0.999
    err = assert_error(post(server, {"input": [[15339, 999_999]], "model": "m"}), 400, "input")
    assert "cl100k" in err["message"] and "--token-ids model" in err["message"]


def test_case_5_model_vocabulary_ids_by_explicit_choice(tmp_path, st_model, st_embed):
    text = "ids of the model's own tokenizer"
    ids = st_model.tokenizer(text)["input_ids"]
    with run_server(tmp_path, "--token-ids", "model") as s:
        r = post(s, {"input": [ids], "model": "m"})
        assert cosine(vectors(r), st_embed([text])).min() >= 0.9999
        err = assert_error(post(s, {"input": [[101, 50_000, 102]], "model": "m"}), 400, "input")
        assert "--token-ids cl100k" in err["message"]


def test_case_6_langchain_without_ctx_check_and_llamaindex(server, st_embed):
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    texts = [f"document number {i} about embeddings" for i in range(7)]
    lc = OpenAIEmbeddings(
        base_url=server.url + "/v1", api_key="sk-x", model="m", check_embedding_ctx_length=False, chunk_size=3
    )
    assert cosine(lc.embed_documents(texts), st_embed(texts)).min() >= 0.9999

    li = OpenAILikeEmbedding(model_name="all-MiniLM-L6-v2", api_base=server.url + "/v1", api_key="fake")
    li_texts = ["line one\nline two", "plain"]
    got = li.get_text_embedding_batch(li_texts)
    # LlamaIndex replaces newlines with spaces before sending.
    assert cosine(got, st_embed([t.replace("\n", " ") for t in li_texts])).min() >= 0.9999
    assert cosine(li.get_query_embedding("a query"), st_embed(["a query"])).min() >= 0.9999


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": [], "model": "m"}, "input"),
        ({"input": [[]], "model": "m"}, "input"),
        ({"model": "m"}, "input"),
        ({"input": "x"}, "model"),
        ({"input": 42, "model": "m"}, "input"),
        ({"input": [1.5], "model": "m"}, "input"),
        ({"input": ["a", 1], "model": "m"}, "input"),
        ({"input": [[1, "a"]], "model": "m"}, "input"),
        ({"input": [True], "model": "m"}, "input"),
        ({"input": {"a": 1}, "model": "m"}, "input"),
        ({"input": "x", "model": 7}, "model"),
    ],
)
def test_case_7_bad_input_is_a_400_naming_the_param(server, body, param):
    assert_error(post(server, body), 400, param, "invalid_request_error")


def test_case_7_empty_string_embeds_like_sentence_transformers(server, st_embed):
    r = post(server, {"input": "", "model": "m"})
    assert r.json()["usage"]["prompt_tokens"] == 2  # [CLS] [SEP]
    assert cosine(vectors(r), st_embed([""])).min() >= 0.9999


def test_case_8_long_input_truncated_by_default_or_refused(server, st_embed):
    long = "word " * 700
    r = post(server, {"input": long, "model": "m"})
    assert r.json()["usage"]["prompt_tokens"] == 256
    assert cosine(vectors(r), st_embed([long])).min() >= 0.9999
    err = assert_error(post(server, {"input": ["ok", long], "model": "m", "truncate": False}), 400, "input")
    assert err["message"].startswith(
        "This model's maximum context length is 256 tokens, however you requested 702 tokens"
    )


def test_case_8_a_server_that_refuses_long_input_unless_the_request_says_truncate(tmp_path):
    long = "word " * 700
    with run_server(tmp_path, "--no-truncate") as s:
        err = assert_error(post(s, {"input": long, "model": "m"}), 400, "input")
        assert "maximum context length is 256 tokens" in err["message"]
        assert post(s, {"input": long, "model": "m", "truncate": True}).status_code == 200


def test_case_9_unit_norm_normalize_and_dimensions(server, st_embed, st_unnormalized):
    v = vectors(post(server, {"input": TEXTS, "model": "m"}))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)  # the model has a Normalize module
    cut = vectors(post(server, {"input": TEXTS, "model": "m", "dimensions": 64}))
    assert cut.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1, atol=1e-5)
    ref = st_embed(TEXTS)[:, :64]
    np.testing.assert_allclose(cut, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)
    raw = vectors(post(server, {"input": TEXTS, "model": "m", "normalize": False}))
    want = st_unnormalized(TEXTS)
    assert np.linalg.norm(want, axis=1).min() > 1.5  # unnormalised MiniLM means are far from unit length
    np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-4)  # values, not only directions
    for bad in (0, D + 1, "8", 1.5, True):
        assert_error(post(server, {"input": "x", "model": "m", "dimensions": bad}), 400, "dimensions")


def test_case_10_same_vector_alone_in_a_batch_at_any_position(server):
    texts = [f"sentence {i} " + "pad " * (i * 7 % 90) for i in range(64)]
    batch = vectors(post(server, {"input": texts, "model": "m"}))
    for i in (0, 31, 63):
        alone = vectors(post(server, {"input": texts[i], "model": "m"}))[0]
        assert np.abs(alone - batch[i]).max() <= 1e-5
    reversed_batch = vectors(post(server, {"input": texts[::-1], "model": "m"}))
    assert np.abs(reversed_batch[::-1] - batch).max() <= 1e-5


def test_case_11_malformed_json_and_unknown_route(server):
    r = httpx.post(server.url + "/v1/embeddings", content=b'{"input": "x", "model":', timeout=10,
                   headers={"content-type": "application/json"})
    assert_error(r, 400, None, "invalid_request_error")
    assert_error(httpx.post(server.url + "/v1/embeddings", content=b"", timeout=10), 400)
    assert_error(httpx.get(server.url + "/v1/nothing-here", timeout=10), 404)
    assert_error(httpx.get(server.url + "/v1/embeddings", timeout=10), 405)


def test_case_11_auth_413_and_unknown_model(tmp_path):
    with run_server(tmp_path, "--api-key", "k1,k2", "--max-body-bytes", "2000", "--reject-unknown-model", "true") as s:
        body = {"input": "x", "model": "all-MiniLM-L6-v2"}
        assert_error(post(s, body), 401, None, "authentication_error")
        assert_error(post(s, body, headers={"Authorization": "Bearer nope"}), 401)
        assert_error(post(s, body, headers={"Authorization": "k1"}), 401)
        assert post(s, body, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # probes carry no key
        assert httpx.get(s.url + "/ready").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        ok = {"Authorization": "Bearer k1"}
        err = assert_error(post(s, {"input": "x", "model": "text-embedding-ada-002"}, headers=ok), 404, "model")
        assert err["code"] == "model_not_found"
        err = assert_error(post(s, {"input": "x" * 3000, "model": "all-MiniLM-L6-v2"}, headers=ok), 413)
        # The openai client surfaces these as typed errors.
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.embeddings.create(input="x", model="all-MiniLM-L6-v2")


def test_case_11_queue_full_is_429_with_retry_after(tmp_path):
    import asyncio

    flags = ("--max-queue", "8", "--max-inputs-per-request", "8", "--max-batch-tokens", "256")
    with run_server(tmp_path, *flags) as s:
        long = ["word " * 300] * 8

        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(
                    *(c.post(s.url + "/v1/embeddings", json={"input": long, "model": "m"}) for _ in range(12))
                )

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert_error(rejected, 429, None, "rate_limit_error")
        assert int(rejected.headers["retry-after"]) >= 1


def test_case_12_any_bearer_token_without_a_configured_key(server):
    for header in ({"Authorization": "Bearer sk-whatever"}, {"Authorization": "Bearer x"}, {"Authorization": "Basic abc"}, {}):
        assert post(server, {"input": "x", "model": "m"}, headers=header).status_code == 200


def test_case_13_models_list(server):
    body = httpx.get(server.url + "/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "all-MiniLM-L6-v2" and card["object"] == "model"
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)


def test_alias_route_and_unknown_fields_ignored(server, st_embed):
    r = httpx.post(server.url + "/embeddings", timeout=30,
                   json={"input": ["x"], "model": "m", "user": "u1", "something_new": {"a": [1]}})
    assert r.status_code == 200
    assert cosine(vectors(r), st_embed(["x"])).min() >= 0.9999


def test_served_offline_and_logs_the_choices(server):
    import torch

    from embedserve.kernels.linear import select_linear_backend

    log = server.output()
    linear = select_linear_backend(torch.device("cpu"), torch.float32)  # onednn where this CPU's torch has it
    for words in ("attention sdpa_bucketed", f"linear {linear}", "pooling mean", "dtype float32", "warm-up", "ready"):
        assert words in log, words
    from embedserve.engine.cpu import read_cpu

    cpu_line = next(line for line in log.splitlines() if "embedserve.engine.loading: cpu: " in line)
    assert read_cpu().model in cpu_line and "AVX2 " in cpu_line and "AVX512-BF16 " in cpu_line
    assert cpu_line.endswith("dtype float32 (asked)")  # the tests' servers ask for float32
    assert json.loads(httpx.get(server.url + "/health").text) == {"status": "ok"}


def test_a_model_that_cannot_load_stops_the_server_with_its_reason(tmp_path):
    import subprocess
    import sys

    (tmp_path / "config.json").write_text('{"architectures": ["GPTNeoXModel"], "model_type": "gpt_neox"}')
    proc = subprocess.run(
        [sys.executable, "-m", "embedserve", "serve", "--model", str(tmp_path), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "unsupported model" in proc.stderr and "BertModel" in proc.stderr


def test_flags_fall_back_to_environment_variables():
    from embedserve.cli import build_config, build_parser

    env = {"EMBEDSERVE_PORT": "9123", "EMBEDSERVE_TRUNCATE": "false", "EMBEDSERVE_API_KEY": "a,b",
           "EMBEDSERVE_MAX_BATCH_TOKENS": "1024", "EMBEDSERVE_TOKEN_IDS": "model"}
    config = build_config(build_parser(env).parse_args(["serve"]))
    assert config.server.port == 9123 and config.server.api_keys == ("a", "b")
    assert config.engine.truncate is False and config.engine.scheduler.max_batch_tokens == 1024
    assert config.engine.token_ids == "model"
    # A flag beats its variable.
    assert build_config(build_parser(env).parse_args(["serve", "--port", "1"])).server.port == 1
    help_text = build_parser({}).parse_args.__self__._subparsers._group_actions[0].choices["serve"].format_help()
    for var in ("EMBEDSERVE_MODEL", "EMBEDSERVE_MAX_QUEUE", "EMBEDSERVE_API_KEY", "EMBEDSERVE_DTYPE"):
        assert var in help_text


def test_cases_1_3_9_with_the_triton_pool_encode_kernel_forced_on(tmp_path, st_embed, st_unnormalized):
    """The fused kernel (Triton's interpreter on CPU) end to end: floats, base64 spliced from the kernel's bytes,
    dimensions and normalize mixed in one batch."""
    import asyncio

    with run_server(tmp_path, "--pool-kernel", "triton", env={"TRITON_INTERPRET": "1"}) as s:
        assert "pool+encode triton" in s.output()
        variants = [
            {"encoding_format": "float"},
            {"encoding_format": "base64"},
            {"encoding_format": "base64", "dimensions": 100},  # 400 bytes: 100 % 3 == 1 -> '==' padding
            {"encoding_format": "base64", "dimensions": 65},  # 65 % 3 == 2 -> '=' padding
            {"encoding_format": "float", "normalize": False},
        ]

        async def together():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(
                    *(c.post(s.url + "/v1/embeddings", json={"input": TEXTS, "model": "m", **v}) for v in variants)
                )

        responses = asyncio.run(together())
    ref = st_embed(TEXTS)
    for v, r in zip(variants, responses):
        assert r.status_code == 200, r.text
        k = v.get("dimensions", D)
        want = ref[:, :k] / np.linalg.norm(ref[:, :k], axis=1, keepdims=True)
        got = []
        for item in r.json()["data"]:
            e = item["embedding"]
            if isinstance(e, str):
                raw = base64.b64decode(e, validate=True)
                assert len(raw) == 4 * k and e == base64.b64encode(raw).decode()
                e = np.frombuffer(raw, "<f4")
            got.append(e)
        got = np.asarray(got, dtype=np.float64)
        assert got.shape == (len(TEXTS), k)
        if v.get("normalize", True):
            np.testing.assert_allclose(got, want, atol=1e-5)
        else:  # the raw mean, as sentence-transformers computes it without its Normalize module
            np.testing.assert_allclose(got, st_unnormalized(TEXTS), rtol=1e-4, atol=1e-4)

"""Several models in one server process (--model given more than once): routed by the request's model, each
answering as when served alone, sharing the device in turns."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from on_device import ON_CUDA
from serving import run_server
from tiny import MINILM_DIR, build_tiny_cross_encoder, build_tiny_encoder, embed_with, mixed_texts

TEXTS = mixed_texts(6, seed=12)
QUERY = "what is a search query"


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("several")
    build_tiny_encoder(root / "xlmr", "xlm-roberta", seed=3)
    ce = build_tiny_cross_encoder(root / "ce", "bert", seed=4)
    flags = ["--model", f"all-MiniLM-L6-v2={MINILM_DIR}", "--model", f"small={root / 'xlmr'}", "--model", f"rr={root / 'ce'}"]
    with run_server(root, *flags) as server:
        yield server, root, ce


def post(server, route, body):
    return httpx.post(server.url + route, json=body, timeout=30)


def test_each_name_reaches_its_model(three, st_embed):
    server, root, ce = three
    minilm = post(server, "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": TEXTS}).json()
    got = np.array([d["embedding"] for d in minilm["data"]])
    np.testing.assert_allclose(got, st_embed(TEXTS), atol=1e-5)
    assert minilm["model"] == "all-MiniLM-L6-v2"
    small = post(server, "/v1/embeddings", {"model": "small", "input": TEXTS}).json()
    alone = embed_with(root / "xlmr", TEXTS)
    assert (torch.tensor([d["embedding"] for d in small["data"]]) - alone).abs().max() <= 1e-5
    assert small["model"] == "small"
    ranked = post(server, "/v1/rerank", {"model": "rr", "query": QUERY, "documents": TEXTS}).json()
    want = ce.predict([(QUERY, t) for t in TEXTS])
    assert [r["index"] for r in ranked["results"]] == list(np.argsort(-want))
    assert all(abs(r["relevance_score"] - want[r["index"]]) <= 1e-5 for r in ranked["results"])
    # TEI's routes name no model: the first one answers.
    tei = np.array(post(server, "/embed", {"inputs": TEXTS[:2]}).json())
    np.testing.assert_allclose(tei, st_embed(TEXTS[:2]), atol=1e-5)


def test_models_list_unknown_names_and_kinds(three):
    server, _, _ = three
    cards = httpx.get(server.url + "/v1/models").json()["data"]
    assert [(c["id"], c["kind"], c["dimensions"]) for c in cards] == [
        ("all-MiniLM-L6-v2", "embedding", 384), ("small", "embedding", 36), ("rr", "rerank", 1)]
    r = post(server, "/v1/embeddings", {"model": "text-embedding-3-small", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "all-MiniLM-L6-v2, small, rr" in r.json()["error"]["message"]
    r = post(server, "/v1/rerank", {"model": "small", "query": QUERY, "documents": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    metrics = httpx.get(server.url + "/metrics").text
    for name, kind in (("all-MiniLM-L6-v2", "embedding"), ("small", "embedding"), ("rr", "rerank")):
        assert f'embedserve_model_info{{kind="{kind}",model="{name}"}} 1.0' in metrics
        assert f'embedserve_model_queue_inputs{{model="{name}"}} 0.0' in metrics
        assert f'embedserve_model_max_queue{{model="{name}"}} 16384.0' in metrics


def test_the_same_name_twice_is_refused_at_start_up(tmp_path):
    from embedserve.cli import build_config, build_parser
    from embedserve.errors import ConfigError

    args = build_parser({}).parse_args(["serve", "--model", f"a={MINILM_DIR}", "--model", f"a={MINILM_DIR}"])
    with pytest.raises(ConfigError, match="served model names must differ"):
        build_config(args)


def test_a_config_file_gives_each_model_its_own_kind(tmp_path, st_embed):
    """An embedder with prompts of its own (an e5-style query / passage pair the folder does not ship) and a
    Qwen3-Reranker (a causal LM that only `kind = "rerank"` makes a reranker) side by side."""
    from tiny import build_tiny_qwen3_reranker

    build_tiny_qwen3_reranker(tmp_path / "qwen3")
    (tmp_path / "models.toml").write_text(
        f'[[model]]\nname = "mini"\nmodel = "{MINILM_DIR}"\n'
        'prompts = { query = "query: ", passage = "passage: " }\ndefault_prompt_name = "query"\n\n'
        f'[[model]]\nname = "rr"\nmodel = "{tmp_path / "qwen3"}"\nkind = "rerank"\nmax_batch_tokens = 2048\n')
    with run_server(tmp_path, "--config", str(tmp_path / "models.toml")) as server:
        cards = httpx.get(server.url + "/v1/models").json()["data"]
        assert [(c["id"], c["kind"]) for c in cards] == [("mini", "embedding"), ("rr", "rerank")]
        got = post(server, "/v1/embeddings", {"model": "mini", "input": TEXTS[:2]}).json()["data"]
        np.testing.assert_allclose(np.array([d["embedding"] for d in got]), st_embed(TEXTS[:2], prompt="query: "),
                                   atol=1e-5)  # the configured default prompt
        got = post(server, "/v1/embeddings", {"model": "mini", "input": TEXTS[:2], "prompt_name": "passage"})
        np.testing.assert_allclose(np.array([d["embedding"] for d in got.json()["data"]]),
                                   st_embed(TEXTS[:2], prompt="passage: "), atol=1e-5)
        assert not np.allclose(st_embed(TEXTS[:2], prompt="passage: "), st_embed(TEXTS[:2]), atol=1e-3)
        bad = post(server, "/v1/embeddings", {"model": "mini", "input": "x", "prompt_name": "title"})
        assert bad.status_code == 400 and "passage, query" in bad.json()["error"]["message"]
        r = post(server, "/v1/rerank", {"model": "rr", "query": QUERY, "documents": TEXTS})
        assert r.status_code == 200 and len(r.json()["results"]) == len(TEXTS)
        assert httpx.get(server.url + "/info").json()["max_batch_tokens"] == 4096  # /info is the first model's
    assert "max batch 2048 tokens" in server.output()  # the reranker's own budget


def test_a_model_whose_engine_stops_fails_alone(tmp_path, st_embed):
    """A fault that stops one model's engine (not the device) fails only that model: its requests get 503,
    the other model keeps serving, /health and /ready stay 200, /metrics marks it."""
    build_tiny_encoder(tmp_path / "xlmr", "xlm-roberta", seed=3)
    flags = ["--model", f"mini={MINILM_DIR}", "--model", f"small={tmp_path / 'xlmr'}",
             "--fault-marker", "BOOM", "--fault-kind", "crash"]
    with run_server(tmp_path, *flags) as server:
        assert post(server, "/v1/embeddings", {"model": "small", "input": "BOOM"}).status_code == 503
        r = post(server, "/v1/embeddings", {"model": "small", "input": "hello"})
        assert r.status_code == 503 and "'small' stopped" in r.json()["error"]["message"], r.text
        ok = post(server, "/v1/embeddings", {"model": "mini", "input": TEXTS[:2]})
        assert ok.status_code == 200
        np.testing.assert_allclose(np.array([d["embedding"] for d in ok.json()["data"]]), st_embed(TEXTS[:2]),
                                   atol=1e-5)
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/ready").status_code == 200
        metrics = httpx.get(server.url + "/metrics").text
        assert 'embedserve_model_failed{model="small"} 1.0' in metrics
        assert 'embedserve_model_failed{model="mini"} 0.0' in metrics
        assert server.proc.poll() is None  # still running
    assert "model 'small' stopped" in server.output()


def test_a_model_that_cannot_load_stops_the_start_up_naming_it(tmp_path):
    flags = ["--model", f"mini={MINILM_DIR}", "--model", f"ghost={tmp_path / 'nowhere'}"]
    with run_server(tmp_path, *flags, wait_ready=False) as server:
        assert server.proc.wait(120) != 0
    assert f"model 'ghost' ({tmp_path / 'nowhere'}) failed to load" in server.output()


@pytest.mark.skipif(ON_CUDA, reason="on the CPU an address-space limit (ulimit -v) stands in for a small device")
def test_models_that_cannot_all_warm_up_within_the_memory_stop_the_start_up_naming_them(tmp_path):
    """Every model warms up beside all the weights: under the same memory limit two MiniLMs with the CPU's
    budgets start and serve, while a second one whose warm-up step needs more than is left stops the start-up,
    naming the model, the models beside it and the flag to lower."""
    limit = 3 << 30  # a two-MiniLM server peaks near 1.7 GiB of address space
    with run_server(tmp_path, "--model", f"a={MINILM_DIR}", "--model", f"b={MINILM_DIR}",
                    address_space=limit) as server:
        assert post(server, "/v1/embeddings", {"model": "b", "input": TEXTS}).status_code == 200
    assert "memory after every warm-up: cpu: peak resident" in server.output()
    assert "limit 3072 MiB, the address-space limit (ulimit -v)" in server.output()
    # b's warm-up: 16,384 inputs of 256 tokens; its first activation alone (6 GiB) cannot be allocated, so the
    # refusal comes from torch's allocator (a step that fails deeper, inside oneDNN, words it otherwise).
    (tmp_path / "models.toml").write_text(f'[[model]]\nname = "b"\nmodel = "{MINILM_DIR}"\n'
                                          'max_batch_tokens = 4194304\nmax_batch_requests = 16384\n')
    with run_server(tmp_path, "--model", f"a={MINILM_DIR}", "--config", str(tmp_path / "models.toml"),
                    wait_ready=False, address_space=limit) as server:
        assert server.proc.wait(120) != 0
    assert (f"model 'b' ({MINILM_DIR}) failed to warm up, beside the weights of a, b: warm-up pass of 4194304 "
            "tokens ran out of CPU memory; lower --max-batch-tokens (now 4194304)") in server.output()

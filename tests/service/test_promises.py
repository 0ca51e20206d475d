"""What the README promises an operator or a client, each on a real server: the timing headers, both model lists,
the 4xx for malformed fields, 503 before ready, --revision, the grace period running out, a device fault with
several models, the per-model metrics and the 429 counter."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from fakehub import FakeHub
from polling import until
from serving import run_server
from tiny import MINILM_DIR, build_tiny_cross_encoder, build_tiny_encoder

QUERY = "which passage answers the question"
TEXTS = ["a passage about search", "something else entirely", "the question's answer"]


def metrics(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def gauge(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_every_embedding_answer_says_its_times_and_both_model_lists_agree(server):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["one", "two"], "model": "m"}, timeout=60)
    assert r.status_code == 200
    for header in ("x-queue-time", "x-tokenization-time", "x-inference-time"):
        assert float(r.headers[header]) >= 0, header  # milliseconds
    assert int(r.headers["x-total-tokens"]) == r.json()["usage"]["total_tokens"]
    short, long = httpx.get(server.url + "/models").json(), httpx.get(server.url + "/v1/models").json()
    assert short == long and short["object"] == "list"
    (model,) = short["data"]
    assert model["object"] == "model" and model["kind"] == "embedding" and model["dimensions"] == 384


@pytest.mark.parametrize("path, body, param", [
    ("/v1/embeddings", {"input": "x", "model": "m", "encoding_format": "float64"}, "encoding_format"),
    ("/v1/embeddings", {"input": "x", "model": "m", "truncate": "yes"}, "truncate"),
    ("/v1/embeddings", {"input": "x", "model": "m", "normalize": "no"}, "normalize"),
    ("/v1/embeddings", {"input": "x", "model": "m", "normalize": 1}, "normalize"),
    ("/tokenize", {}, "inputs"),
    ("/tokenize", {"inputs": 5}, "inputs"),
    ("/tokenize", {"inputs": [1, 2]}, "inputs"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/embed", {"inputs": "x", "prompt_name": "query"}, "prompt_name"),  # MiniLM has no prompts
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_a_malformed_field_is_a_400_that_names_it(server, path, body, param):
    r = httpx.post(server.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """MiniLM and a tiny cross-encoder, a queue of at most 2,000 inputs each."""
    root = tmp_path_factory.mktemp("two-models")
    build_tiny_cross_encoder(root / "rr", "bert", seed=1)
    with run_server(root, "--model", f"mini={MINILM_DIR}", "--model", f"rr={root / 'rr'}", "--max-queue", "2000",
                    "--max-inputs-per-request", "2000", "--max-batch-tokens", "512") as server:
        yield server


def test_an_unknown_model_on_the_rerank_route_is_a_404_that_lists_the_served_ones(two_models):
    r = httpx.post(two_models.url + "/v1/rerank", json={"model": "nope", "query": QUERY, "documents": TEXTS})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "serves: mini, rr" in err["message"]


def test_each_served_model_has_its_own_metric_series(two_models):
    assert httpx.post(two_models.url + "/v1/embeddings", json={"model": "mini", "input": TEXTS}).status_code == 200
    assert httpx.post(two_models.url + "/v1/rerank", json={"model": "rr", "query": QUERY,
                                                           "documents": TEXTS}).status_code == 200
    text = metrics(two_models)
    assert 'embedserve_model_info{kind="embedding",model="mini"} 1.0' in text
    assert 'embedserve_model_info{kind="rerank",model="rr"} 1.0' in text
    for name in ("queue_inputs", "queue_tokens", "running_inputs", "failed"):
        for model in ("mini", "rr"):
            assert gauge(text, f'embedserve_model_{name}{{model="{model}"}}') == 0.0, (name, model)
            assert f'embedserve_model_{name}{{model="{model}"}}' in text, (name, model)
    assert gauge(text, 'embedserve_model_max_queue{model="mini"}') == gauge(text, 'embedserve_model_max_queue{model="rr"}') == 2000


def test_a_full_queue_answers_429_with_retry_after_and_counts_it(two_models):
    """A request of 2,000 long inputs fills mini's queue for minutes; once the server's metrics show it queued,
    the next request to mini gets 429 (rr's queue is its own and still answers); the client of the first then
    walks away and its inputs are dropped."""
    url = two_models.url
    big = {"model": "mini", "input": [f"word {i} " * 250 for i in range(2000)]}
    before = gauge(metrics(two_models), "embedserve_rejected_total")

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            first = asyncio.create_task(client.post(url + "/v1/embeddings", json=big))
            deadline = time.monotonic() + 120
            while gauge(await asyncio.to_thread(metrics, two_models), 'embedserve_model_queue_inputs{model="mini"}') < 1000:
                assert time.monotonic() < deadline and not first.done(), "the big request was never queued"
                await asyncio.sleep(0.05)
            refused = await client.post(url + "/v1/embeddings", json={"model": "mini", "input": TEXTS})
            other = await client.post(url + "/v1/rerank", json={"model": "rr", "query": QUERY, "documents": TEXTS})
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            return refused, other

    refused, other = asyncio.run(scenario())
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert other.status_code == 200
    assert gauge(metrics(two_models), "embedserve_rejected_total") == before + 1
    until(lambda: gauge(metrics(two_models), 'embedserve_model_queue_inputs{model="mini"}') == 0,
          "the walked-away request's inputs dropped")


def test_a_device_fault_with_several_models_stops_them_all_and_the_process(tmp_path):
    flags = ("--model", f"mini={MINILM_DIR}", "--model", f"small={tmp_path / 'small'}", "--fault-marker",
             "explode now", "--fault-kind", "fatal", "--shutdown-grace", "2")
    build_tiny_encoder(tmp_path / "small", "bert", seed=2)
    with run_server(tmp_path, *flags) as s:
        bad = httpx.post(s.url + "/v1/embeddings", json={"model": "small", "input": "explode now"}, timeout=60)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
        for model in ("mini", "small"):  # every model, not only the one whose step failed
            r = httpx.post(s.url + "/v1/embeddings", json={"model": model, "input": "later"}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", (model, r.text)
        for path in ("/health", "/ready"):
            assert httpx.get(s.url + path).status_code == 503, path
        assert s.proc.wait(60) == 3
    assert "exiting with 3" in s.output()


def test_the_grace_period_runs_out_with_a_request_still_in_flight(tmp_path):
    """SIGTERM with --shutdown-grace 1 while a request (its body half sent) is still being read: the server
    says so, stops anyway and exits 0."""
    with run_server(tmp_path, "--shutdown-grace", "1") as s:
        host, port = s.url.removeprefix("http://").split(":")

        async def scenario():
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"input\": ")
            await writer.drain()
            deadline = time.monotonic() + 60
            while gauge(await asyncio.to_thread(metrics, s), "embedserve_in_flight_requests") < 1:
                assert time.monotonic() < deadline, "the half-sent request never was in flight"
                await asyncio.sleep(0.02)
            s.proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(s.proc.wait, 60)
            writer.close()
            return code

        assert asyncio.run(scenario()) == 0
    out = s.output()
    assert "shutdown requested: draining 1 in-flight requests (grace 1 s)" in out
    assert "grace period over with 1 requests still in flight; stopping anyway" in out


def test_before_it_is_ready_the_server_answers_503_and_health_200(tmp_path, minilm_dir):
    """A model downloaded from a (fake) Hub that holds its files back: the server listens while it loads, so
    the probes can be asked; /ready and the API answer 503 until the download is let through."""
    hub = FakeHub().start()
    try:
        hub.add("org/slow", minilm_dir)
        hub.hold.clear()
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
        with run_server(tmp_path, "--model", "org/slow", env=env, wait_ready=False) as s:
            until(lambda: hub.held > 0, "the server asked the Hub for a file")
            ready = httpx.get(s.url + "/ready", timeout=10)
            health = httpx.get(s.url + "/health", timeout=10)
            early = httpx.post(s.url + "/v1/embeddings", json={"input": "x", "model": "m"}, timeout=10)
            hub.hold.set()
            until(lambda: httpx.get(s.url + "/ready", timeout=10).status_code == 200, "ready after the download",
                  timeout=120)
            later = httpx.post(s.url + "/v1/embeddings", json={"input": "x", "model": "m"}, timeout=60)
    finally:
        hub.hold.set()
        hub.stop()
    assert ready.status_code == 503 and health.status_code == 200
    assert early.status_code == 503 and early.json()["error"]["type"] == "server_error", early.text
    assert later.status_code == 200


def test_revision_pins_what_download_fetches_and_serve_serves(tmp_path, minilm_dir):
    """`download --revision v1` fills the cache with v1 (a different model from main), and `serve --revision v1`
    then serves v1 offline: its vectors are sentence-transformers' on v1's folder, not main's."""
    from sentence_transformers import SentenceTransformer

    build_tiny_encoder(tmp_path / "v1", "bert", seed=6)
    hub = FakeHub().start()
    try:
        hub.add("org/model", minilm_dir)
        v1 = hub.add("org/model", tmp_path / "v1", revision="v1")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": ""}
        done = subprocess.run([sys.executable, "-m", "embedserve", "download", "org/model", "--revision", "v1"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        asked = [r for r in hub.requests if "/resolve/" in r]
        assert asked and all(f"/resolve/{v1}/" in r or "/resolve/v1/" in r for r in asked), asked
    finally:
        hub.stop()
    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    with run_server(tmp_path, "--model", "org/model", "--revision", "v1", env=offline) as s:
        got = httpx.post(s.url + "/v1/embeddings", json={"input": TEXTS, "model": "m"}, timeout=60).json()
    want = SentenceTransformer(str(tmp_path / "v1"), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(np.array([d["embedding"] for d in got["data"]]), want, atol=1e-5)

"""A server started from a Hub id: it downloads from a fake Hub on 127.0.0.1, logs its progress, serves, and
starts again offline from its cache without a single request; `embedserve download` fills the same cache."""

from __future__ import annotations

import re
import subprocess
import sys

import httpx
import numpy as np

from conftest import MINILM_REPO, hub_env
from embedserve.models.hub import resolve
from serving import run_server


def embed(server, text: str) -> np.ndarray:
    r = httpx.post(server.url + "/v1/embeddings", json={"input": [text], "model": MINILM_REPO}, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["data"][0]["embedding"])


def test_a_server_from_a_hub_id_downloads_serves_and_restarts_offline_from_its_cache(minilm_hub, tmp_path, st_embed):
    env = hub_env(minilm_hub, tmp_path / "hf-home")
    text = "Downloaded from the Hub, then served from the cache."
    with run_server(tmp_path, "--model", MINILM_REPO, env=env) as s:
        first = embed(s, text)
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["id"] == MINILM_REPO  # named by its Hub id
    log = s.output()
    assert re.search(r"downloading sentence-transformers/all-MiniLM-L6-v2 \(revision main\) \(commit [0-9a-f]{12}\): "
                     r"\d+ files, 9\d\.\d MB, from http://127.0.0.1:\d+ into .*hf-home/hub", log)
    assert re.search(r"downloading sentence-transformers/all-MiniLM-L6-v2 \(revision main\): 9\d\.\d of 9\d\.\d MB "
                     r"\(100%\)", log)  # bytes and percent in the log
    np.testing.assert_allclose(first, st_embed([text])[0], atol=1e-5)
    requests = minilm_hub.count()
    with run_server(tmp_path, "--model", MINILM_REPO, env={**env, "HF_HUB_OFFLINE": "1"}) as s:
        # The same weights from the cache. Not bit-for-bit: each start measures which GEMM and attention split
        # run fastest here, and a near-tie can go the other way on a noisy host (both are exact in fp32).
        np.testing.assert_allclose(embed(s, text), first, atol=1e-6)
    assert minilm_hub.count() == requests  # not one request to the Hub
    assert "from the cache at" in s.output() and "(offline)" in s.output()


def test_embedserve_download_fills_the_cache_a_server_reads(minilm_hub, tmp_path):
    env = {**hub_env(minilm_hub, tmp_path / "hf-home"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "embedserve", "download", MINILM_REPO], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.strip()
    assert folder.endswith(tuple("0123456789abcdef")) and "(100%)" in proc.stderr
    requests = minilm_hub.count()
    cached = resolve(MINILM_REPO, cache_dir=tmp_path / "hf-home" / "hub", offline=True)
    assert str(cached.directory) == folder and (cached.directory / "model.safetensors").is_file()
    assert minilm_hub.count() == requests
    bad = subprocess.run([sys.executable, "-m", "embedserve", "download", "sentence-transformers/no-such-model"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "sentence-transformers/no-such-model (revision main) was not found on http://127.0.0.1" in bad.stderr

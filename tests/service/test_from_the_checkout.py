"""`python -m embedserve serve` started in the repository root, on a Llama-family folder with a Llama tokenizer.

From the root, `python -m` puts the checkout first on sys.path, where its kernels/ could stand in for the `kernels`
distribution that transformers' Llama tokenizer path imports (issue 22: the server stopped at start-up with
"cannot import name 'CUDAProperties' from 'kernels'").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openai

from serving import run_server
from tiny import build_tiny_decoder, use_llama_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_a_llama_folder_serves_from_the_repository_root(tmp_path):
    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "llama"
    build_tiny_decoder(folder, "llama", pooling="mean", seed=5)
    use_llama_tokenizer(folder)
    texts = ["the cat sat on the mat", "Hello there, world!", "in 2026 the server ran"]
    with run_server(tmp_path, "--model", str(folder), "--served-model-name", "tiny-llama", cwd=ROOT) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        got = np.array([d.embedding for d in client.embeddings.create(input=texts, model="tiny-llama").data])
    want = SentenceTransformer(str(folder), device="cpu").encode(texts)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999

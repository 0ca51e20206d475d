"""Service fixtures: a shared default server, a fake Hub that serves all-MiniLM-L6-v2, and sentence-transformers
as the reference."""

from __future__ import annotations

import pytest

from fakehub import FakeHub
from serving import run_server

MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def minilm_hub(minilm_dir):
    """A fake Hub on 127.0.0.1 with all-MiniLM-L6-v2 as MINILM_REPO (main)."""
    hub = FakeHub().start()
    hub.add(MINILM_REPO, minilm_dir)
    yield hub
    hub.stop()


def hub_env(hub: FakeHub, home) -> dict[str, str]:
    """A server process that downloads from ``hub`` into its own cache under ``home``."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(home),
            "HF_TOKEN": ""}


@pytest.fixture(scope="session")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def st_embed(st_model):
    def embed(texts, **kw):
        return st_model.encode(list(texts), convert_to_numpy=True, **kw)

    return embed


@pytest.fixture(scope="session")
def st_unnormalized(st_model):
    """What ``normalize: false`` must return: sentence-transformers' own pipeline with its Normalize module left
    out (the transformer and the pooling, nothing else), so values are compared, not only directions."""
    from sentence_transformers import SentenceTransformer

    modules = [m for m in st_model if type(m).__name__ != "Normalize"]
    assert len(modules) == len(st_model) - 1  # MiniLM has one Normalize module: the reference must differ
    bare = SentenceTransformer(modules=modules, device="cpu")

    def embed(texts):
        return bare.encode(list(texts), convert_to_numpy=True)

    return embed

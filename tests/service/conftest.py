"""Service fixtures: a shared default server, and sentence-transformers as the reference."""

from __future__ import annotations

import pytest

from serving import run_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with run_server(tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


@pytest.fixture(scope="session")
def st_embed(st_model):
    def embed(texts, **kw):
        return st_model.encode(list(texts), convert_to_numpy=True, **kw)

    return embed

"""sentence-transformers 6 CrossEncoder folders of causal LMs (Transformer + LogitScore, as Qwen3-Reranker's and
zerank's sentence-transformers versions ship): served as rerankers without --kind, each pair formatted by the
folder's chat template, scored by the LogitScore's token logits, against ``CrossEncoder(folder).predict``."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.errors import ModelLoadError
from on_device import BATCH_INVARIANCE, model_config
from tiny import build_tiny_logit_score_reranker, mixed_texts

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

QUERIES = ["what is a search query", "embedding server", "a"]


def pairs_for(seed: int, n: int = 14):
    # Two pairs past the tokenizer's 512 tokens: cut at the right, with the template's tail written back.
    docs = mixed_texts(n, seed=seed) + ["word " * 700, "alpha beta " * 400, ""]
    return [(QUERIES[i % 3], d) for i, d in enumerate(docs)]


def served_scores(path, pairs, **kw):
    engine = Engine(EngineConfig(model=model_config(path, **kw)))
    engine.start()
    try:
        assert engine.kind == "rerank"
        raw = asyncio.run(engine.score(pairs)).vectors

        async def each():
            return await asyncio.gather(*(engine.score([p]) for p in pairs))

        alone = torch.cat([r.vectors for r in asyncio.run(each())])
        assert (alone - raw).abs().max() <= BATCH_INVARIANCE * max(1.0, raw.abs().max().item())
        return engine.scores(raw)[:, 0], engine
    finally:
        engine.shutdown()


VARIANTS = {
    "yes-no": {},
    "true-token-only": {"false_token": False, "activation": "torch.nn.modules.linear.Identity"},
    "default-prompt": {"prompt": "Given a product question, find the matching review"},
    "no-suffix-restore": {"restore_suffix": False},
    "plain-text-pairs": {"template": None},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_cross_encoder_predict(tmp_path, variant):
    from sentence_transformers import CrossEncoder

    build_tiny_logit_score_reranker(tmp_path, **VARIANTS[variant])
    pairs = pairs_for(5)
    want = CrossEncoder(str(tmp_path), device="cpu").predict(pairs, convert_to_tensor=True).float().cpu()
    got, engine = served_scores(tmp_path, pairs)
    # 1e-5 of the scores' scale: probabilities under a sigmoid, raw logits (about 3 here) under Identity
    assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), variant
    assert torch.equal(got.argsort(descending=True), want.argsort(descending=True))
    assert want.std() > 1e-2
    assert engine.model.head.rows.shape[0] == (1 if variant == "true-token-only" else 2)


def test_the_formatting_details_matter(tmp_path):
    """The checks above can fail: the default prompt, and the tail written back over a cut pair, change scores."""
    from sentence_transformers import CrossEncoder

    build_tiny_logit_score_reranker(tmp_path / "a")
    build_tiny_logit_score_reranker(tmp_path / "b", prompt="Given a product question, find the matching review")
    build_tiny_logit_score_reranker(tmp_path / "c", restore_suffix=False)
    pairs = pairs_for(5)
    plain, prompted, unrestored = (CrossEncoder(str(tmp_path / k), device="cpu").predict(pairs, convert_to_tensor=True)
                                   for k in "abc")
    assert (plain - prompted).abs().max() > 1e-3
    cut = [i for i, (_, d) in enumerate(pairs) if len(d) > 2000]
    assert (plain[cut] - unrestored[cut]).abs().min() > 1e-4
    torch.testing.assert_close(plain[: cut[0]], unrestored[: cut[0]])


def test_refused_where_it_cannot_be_served_as_sentence_transformers_would(tmp_path):
    build_tiny_logit_score_reranker(tmp_path / "roles", template="{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(ModelLoadError, match="does not render a 'query' and a 'document'"):
        Engine(EngineConfig(model=model_config(tmp_path / "roles")))
    build_tiny_logit_score_reranker(tmp_path / "ok")
    with pytest.raises(ModelLoadError, match="CrossEncoder \\(LogitScore\\) reranker; it cannot serve embeddings"):
        Engine(EngineConfig(model=model_config(tmp_path / "ok", kind="embedding")))
    cfg = tmp_path / "ok" / "1_LogitScore" / "config.json"
    cfg.write_text(json.dumps({"true_token_id": 10**6, "false_token_id": 5}))
    with pytest.raises(ModelLoadError, match="token ids \\[1000000, 5\\] to score by"):
        Engine(EngineConfig(model=model_config(tmp_path / "ok")))

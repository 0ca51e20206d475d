"""Qwen3-Reranker: a causal LM served as a reranker (--kind rerank). Its prompt around query and document, and
the score from the last token's "yes" vs "no" logits (only those two rows of the LM head are loaded), against
transformers' Qwen3ForCausalLM forward on the model card's recipe."""

from __future__ import annotations

import asyncio

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.errors import ModelLoadError
from embedserve.models.classifier import apply_activation
from on_device import BATCH_INVARIANCE, model_config
from tiny import QWEN3_RERANKER_PROMPT, build_tiny_qwen3_reranker, byte_tokenizer, long_text, mixed_texts

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

PREFIX, SUFFIX, INSTRUCTION = QWEN3_RERANKER_PROMPT  # the model card's recipe, written out in tiny.py


def reference_scores(model, pairs, max_length: int) -> torch.Tensor:
    """The model card's recipe: its prefix and suffix around ``format_instruction``'s text, tokenized byte for
    byte by the folder's own byte-level tokenizer, scored by transformers' forward."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer())
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    out = []
    with torch.no_grad():
        for q, d in pairs:
            text = f"<Instruct>: {INSTRUCTION}\n<Query>: {q}\n<Document>: {d}"
            middle = tok(text, truncation=True, max_length=max_length - len(prefix) - len(suffix))["input_ids"]
            logits = model(input_ids=torch.tensor([prefix + middle + suffix])).logits[0, -1]
            out.append(torch.log_softmax(logits[[no, yes]], dim=0)[1].exp())
    return torch.stack(out)


@pytest.fixture(scope="module", params=[False, True], ids=["lm_head", "tied"])
def qwen3_reranker(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-reranker")
    return path, build_tiny_qwen3_reranker(path, tied=request.param)


def pairs_for(seed: int, n: int = 16):
    queries = ["what is a search query", "embedding server", "a"]
    docs = mixed_texts(n, seed=seed) + [long_text(1500, seed=seed)]  # one pair past the 1024-token limit
    return [(queries[i % 3], d) for i, d in enumerate(docs)]


def test_yes_no_score_matches_the_model_card_recipe_alone_and_in_packed_batches(qwen3_reranker):
    path, model = qwen3_reranker
    engine = Engine(EngineConfig(model=model_config(path, kind="rerank")))
    engine.start()
    try:
        assert engine.kind == "rerank"
        pairs = pairs_for(2)
        raw = asyncio.run(engine.score(pairs)).vectors
        got = apply_activation(raw, engine.model.classifier.activation)[:, 0]
        want = reference_scores(model, pairs, engine.max_length)
        assert (got - want).abs().max() <= 1e-5
        assert torch.equal(got.argsort(descending=True), want.argsort(descending=True))
        assert want.std() > 1e-2

        async def each():
            return await asyncio.gather(*(engine.score([p]) for p in pairs))

        alone = torch.cat([r.vectors for r in asyncio.run(each())])
        assert (alone - raw).abs().max() <= BATCH_INVARIANCE * max(1.0, raw.abs().max().item())
    finally:
        engine.shutdown()


def test_only_the_two_rows_of_the_lm_head_are_kept(qwen3_reranker):
    path, _ = qwen3_reranker
    from embedserve.models.sentence import load_model

    loaded = load_model(path, dtype=torch.float32, device=torch.device("cpu"), kind="rerank")
    assert tuple(loaded.head.rows.shape) == (2, 40)


def test_a_causal_lm_is_not_a_reranker_unless_asked_and_an_encoder_cannot_be_one(qwen3_reranker, tmp_path):
    path, _ = qwen3_reranker
    from embedserve.models.sentence import load_model
    from tiny import build_tiny_encoder

    assert load_model(path, dtype=torch.float32, device=torch.device("cpu")).kind == "embedding"
    build_tiny_encoder(tmp_path, "bert")
    with pytest.raises(ModelLoadError, match="--kind rerank needs a causal language model"):
        load_model(tmp_path, dtype=torch.float32, device=torch.device("cpu"), kind="rerank")

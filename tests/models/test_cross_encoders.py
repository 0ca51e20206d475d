"""Tiny random cross-encoders (BERT, XLM-RoBERTa, ModernBERT sequence classification) served by embedserve's
packed engine, against sentence-transformers' CrossEncoder.predict on the same folder."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from embedserve.config import EngineConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import WrongModelKind
from embedserve.models.classifier import apply_activation
from on_device import BATCH_INVARIANCE, model_config
from tiny import CROSS_ENCODERS, build_tiny_cross_encoder, long_text, mixed_texts

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE

QUERIES = ["what is a search query", "embedding server", "a", "token batch vector model " * 30]


def pairs_for(seed: int, n: int = 24) -> list[tuple[str, str]]:
    docs = mixed_texts(n, seed=seed) + [long_text(700, seed=seed)]  # one document past the 512-token limit
    return [(QUERIES[i % len(QUERIES)], d) for i, d in enumerate(docs)]


@pytest.fixture(scope="module", params=CROSS_ENCODERS)
def cross_encoder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"ce-{request.param}")
    return request.param, path, build_tiny_cross_encoder(path, request.param, seed=1)


@pytest.fixture(scope="module")
def engine(cross_encoder):
    engine = Engine(EngineConfig(model=model_config(cross_encoder[1])))
    engine.start()
    yield engine
    engine.shutdown()


def scores(engine: Engine, pairs, **kw) -> torch.Tensor:
    raw = asyncio.run(engine.score(pairs, **kw)).vectors
    return apply_activation(raw, engine.model.classifier.activation)


def test_scores_match_cross_encoder_predict_and_rank_the_same(cross_encoder, engine):
    kind, _, ce = cross_encoder
    pairs = pairs_for(3)
    want = torch.tensor(ce.predict(pairs))
    got = scores(engine, pairs)[:, 0]
    assert engine.kind == "rerank" and engine.model.classifier.activation == "sigmoid"
    assert (got - want).abs().max() <= 1e-5, kind
    assert torch.equal(got.argsort(descending=True), want.argsort(descending=True)), kind
    assert want.std() > 1e-3  # the scores really differ from pair to pair


def test_a_pair_alone_equals_the_pair_inside_a_mixed_packed_batch(engine):
    pairs = pairs_for(4, 40)

    async def each():
        return await asyncio.gather(*(engine.score([p]) for p in pairs))

    together = asyncio.run(engine.score(pairs)).vectors
    alone = torch.cat([r.vectors for r in asyncio.run(each())])
    assert (together - alone).abs().max() <= BATCH_INVARIANCE


def test_truncation_keeps_a_short_query_and_cuts_the_document(cross_encoder, engine):
    """transformers' truncation=True on a pair cuts the longer text first; refused without truncation."""
    _, _, ce = cross_encoder
    pair = ("short query", long_text(900, seed=2))
    ids, starts = engine.tokenizer.encode_pairs([pair], truncate=True)
    assert len(ids[0]) == engine.max_length
    want = ce.tokenizer(*pair, truncation=True, max_length=engine.max_length)["input_ids"]
    assert ids[0] == want
    from embedserve.errors import ContextLengthExceeded

    with pytest.raises(ContextLengthExceeded):
        asyncio.run(engine.score([pair], truncate=False))


def test_bert_pairs_carry_token_types_and_they_matter(tmp_path):
    ce = build_tiny_cross_encoder(tmp_path, "bert", seed=2)
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    try:
        pairs = pairs_for(5, 8)
        with_types = scores(engine, pairs)[:, 0]
        assert (with_types - torch.tensor(ce.predict(pairs))).abs().max() <= 1e-5
        engine.worker.token_types = False  # every token type 0: what a server ignoring the pair boundary computes
        assert (scores(engine, pairs)[:, 0] - with_types).abs().max() > 1e-3
    finally:
        engine.shutdown()


@pytest.mark.parametrize("activation_fn, expected", [
    ("torch.nn.modules.linear.Identity", "identity"), ("torch.nn.modules.activation.Tanh", "tanh")])
def test_the_declared_activation_is_applied(tmp_path, activation_fn, expected):
    ce = build_tiny_cross_encoder(tmp_path, "xlm-roberta", seed=3)
    path = tmp_path / "config_sentence_transformers.json"
    cfg = json.loads(path.read_text())
    cfg["activation_fn"] = activation_fn
    path.write_text(json.dumps(cfg))
    from sentence_transformers import CrossEncoder

    ce = CrossEncoder(str(tmp_path), device="cpu")
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    try:
        assert engine.model.classifier.activation == expected
        pairs = pairs_for(6, 8)
        assert (scores(engine, pairs)[:, 0] - torch.tensor(ce.predict(pairs))).abs().max() <= 1e-5
    finally:
        engine.shutdown()


def test_a_classifier_of_several_labels_gives_every_logit(tmp_path):
    ce = build_tiny_cross_encoder(tmp_path, "bert", num_labels=3, seed=4,
                                  id2label={0: "contradiction", 1: "entailment", 2: "neutral"})
    engine = Engine(EngineConfig(model=model_config(tmp_path)))
    engine.start()
    try:
        assert engine.kind == "classify"
        assert engine.model.classifier.labels == ("contradiction", "entailment", "neutral")
        pairs = pairs_for(7, 8)
        got = scores(engine, pairs)
        assert got.shape == (len(pairs), 3)
        # Raw logits (identity activation for several labels), spread about 2 by the fixture; fp32 rounding
        # through the rescaled head reaches a few 1e-5 there, so 1e-4, still 5e-5 of the spread.
        assert (got - torch.tensor(ce.predict(pairs))).abs().max() <= 1e-4
        assert torch.equal(got.argmax(1), torch.tensor(ce.predict(pairs)).argmax(1))
    finally:
        engine.shutdown()


def test_the_wrong_kind_of_request_is_refused_saying_what_the_model_is(engine, tmp_path):
    with pytest.raises(WrongModelKind, match="the served model is a reranker"):
        asyncio.run(engine.embed(["x"], EmbedOptions()))


def test_a_plain_transformers_folder_and_a_saved_max_length(tmp_path):
    """No sentence-transformers files at all: sigmoid for one label, as CrossEncoder defaults. And a folder saved
    from CrossEncoder(max_length=64) (sentence-transformers keeps it as the tokenizer's model_max_length)."""
    from sentence_transformers import CrossEncoder

    build_tiny_cross_encoder(tmp_path / "plain", "bert", seed=9)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (tmp_path / "plain" / name).unlink(missing_ok=True)
    CrossEncoder(str(tmp_path / "plain"), device="cpu", max_length=64).save_pretrained(str(tmp_path / "short"))
    pairs = pairs_for(8, 10)
    for folder, length in (("plain", 512), ("short", 64)):
        ce = CrossEncoder(str(tmp_path / folder), device="cpu")
        engine = Engine(EngineConfig(model=model_config(tmp_path / folder)))
        engine.start()
        try:
            assert engine.max_length == length and engine.model.classifier.activation == "sigmoid"
            # The same fp32 rounding through the rescaled head as above, through a sigmoid's slope (<= 1/4): up to
            # about 1.1e-5 on an AVX-512 + AMX Xeon (oneDNN's GEMMs there sum in another order), so 5e-5, still
            # far below what another activation or a cut input would change.
            assert (scores(engine, pairs)[:, 0] - torch.tensor(ce.predict(pairs))).abs().max() <= 5e-5, folder
        finally:
            engine.shutdown()

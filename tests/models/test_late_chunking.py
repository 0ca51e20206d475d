"""Late chunking against transformers' forward on the same ids: the reference below builds the document, runs it
(whole, or window by window with the token states taken from the first window that may give them), and pools each
chunk's span itself; the engine must give the same vectors (cos >= 0.99999 in fp32)."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from embedserve.config import EngineConfig, SchedulerConfig
from embedserve.engine.front import Engine
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import InvalidRequest
from on_device import model_config
from tiny import build_tiny_decoder, build_tiny_encoder, long_text

SHORT = ["Berlin is the capital of Germany.", " It has about 3.8 million inhabitants.", " The city is known for its "
         "museums and its nightlife."]


def reference(model, tok, chunks: list[str], *, max_length: int, overlap: int, normalize: bool) -> torch.Tensor:
    """Late chunking written out independently of the engine: the document's token states (per window when it is
    longer than the model), each chunk's mean over its own positions, then L2 normalisation if the model does it."""
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chunks]
    wrapped = tok("a")["input_ids"]
    bare = tok("a", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(wrapped)) if wrapped[i : i + len(bare)] == bare)
    start, end = wrapped[:at], wrapped[at + len(bare):]
    doc = [t for c in ids for t in c]
    s, n = len(start), len(doc)
    states: list[torch.Tensor | None] = [None] * (s + n + len(end))
    width = max_length - s - len(end)
    first = 0
    with torch.no_grad():
        while True:
            window = doc[first : first + width]
            hidden = model(input_ids=torch.tensor([start + window + end])).last_hidden_state[0]
            for j in range(s if first == 0 else 0):
                states[j] = hidden[j]
            for t in range(len(window)):
                if (first == 0 or t >= overlap) and states[s + first + t] is None:
                    states[s + first + t] = hidden[s + t]
            if first + width >= n:
                for j in range(len(end)):
                    states[s + n + j] = hidden[s + len(window) + j]
                break
            first += width - overlap
    assert all(x is not None for x in states)
    vectors, pos = [], s
    for i, c in enumerate(ids):
        lo = 0 if i == 0 else pos
        hi = pos + len(c) if i < len(ids) - 1 else len(states)
        vectors.append(torch.stack(states[lo:hi]).mean(0))
        pos += len(c)
    v = torch.stack(vectors)
    return F.normalize(v, dim=-1) if normalize else v


def run(engine: Engine, chunks, **options):
    return asyncio.run(engine.embed(chunks, EmbedOptions(late_chunking=True, **options)))


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    engine = Engine(EngineConfig(model=model_config(minilm_dir), max_input_tokens=128))
    engine.start()
    yield engine, AutoModel.from_pretrained(str(minilm_dir)).eval(), AutoTokenizer.from_pretrained(str(minilm_dir))
    engine.shutdown()


@pytest.fixture(scope="module")
def cls_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-cls")
    model = build_tiny_encoder(path, "bert", pooling="cls", seed=21)
    engine = Engine(EngineConfig(model=model_config(path), max_input_tokens=64))
    engine.start()
    yield engine, model, AutoTokenizer.from_pretrained(str(path))
    engine.shutdown()


def check(engine, model, tok, chunks, *, overlap, normalize, **options):
    got = run(engine, chunks, late_chunking_overlap=overlap, **options)
    want = reference(model, tok, chunks, max_length=engine.max_length, overlap=overlap, normalize=normalize)
    cos = F.cosine_similarity(got.vectors, want)
    assert cos.min() >= 0.99999, cos
    return got


def test_mean_pooled_minilm_a_document_that_fits_and_one_three_windows_long(minilm):
    engine, model, tok = minilm
    got = check(engine, model, tok, SHORT, overlap=0, normalize=True)
    assert got.vectors.shape == (3, 384) and torch.allclose(got.vectors.norm(dim=1), torch.ones(3))
    document = sum(len(tok(c, add_special_tokens=False)["input_ids"]) for c in SHORT) + 2
    assert got.total_tokens == document  # usage: the document's tokens
    long = [long_text(90, seed=s) for s in range(3)]  # about 300 tokens: three windows of 126 at most
    plain = check(engine, model, tok, long, overlap=0, normalize=True)
    overlapped = check(engine, model, tok, long, overlap=64, normalize=True)
    assert not torch.allclose(plain.vectors, overlapped.vectors, atol=1e-3)
    # the same document's chunks embedded alone differ: the context is what late chunking adds
    alone = asyncio.run(engine.embed(long)).vectors
    assert F.cosine_similarity(alone, plain.vectors).max() < 0.999


def test_cls_pooled_folder_pools_means_over_the_spans_and_windows_with_dimensions(cls_tiny):
    engine, model, tok = cls_tiny
    chunks = [long_text(25, seed=s) for s in range(6)] + ["a"]  # about 150 tokens: three windows of 62
    for overlap in (0, 16):
        got = run(engine, chunks, late_chunking_overlap=overlap, dimensions=16)
        want = reference(model, tok, chunks, max_length=64, overlap=overlap, normalize=False)
        want = F.normalize(want[:, :16], dim=-1)  # dimensions cuts, then renormalises
        assert F.cosine_similarity(got.vectors, want).min() >= 0.99999


def test_a_causal_models_document_in_one_pass_and_as_chunked_prefill(tmp_path):
    model = build_tiny_decoder(tmp_path, "qwen3", pooling="last", seed=4)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    chunks = [long_text(30, seed=s) for s in range(5)]
    got = {}
    for chunk_tokens in (0, 16):  # off: one pass; 16: the document runs as chunks over its key cache
        engine = Engine(EngineConfig(model=model_config(tmp_path), scheduler=SchedulerConfig(
            max_batch_tokens=512, chunk_tokens=chunk_tokens)))
        engine.start()
        try:
            got[chunk_tokens] = run(engine, chunks).vectors
        finally:
            engine.shutdown()
    want = reference(model, tok, chunks, max_length=512, overlap=0, normalize=False)
    for vectors in got.values():
        assert F.cosine_similarity(vectors, want).min() >= 0.99999
    torch.testing.assert_close(got[0], got[16], atol=1e-5, rtol=1e-5)


def test_errors_name_their_field(cls_tiny, tmp_path):
    engine, _, _ = cls_tiny
    with pytest.raises(InvalidRequest) as err:
        run(engine, [[5, 6, 7], [8, 9]])
    assert err.value.param == "late_chunking"
    with pytest.raises(InvalidRequest, match="below the window of 62") as err:
        run(engine, [long_text(100)], late_chunking_overlap=62)
    assert err.value.param == "late_chunking_overlap"
    with pytest.raises(InvalidRequest, match=r"input\[1\] has no tokens"):
        run(engine, ["a b", "", "c d"])
    assert run(engine, ["", "a b", ""]).vectors.shape[0] == 3  # the ends own the special tokens


def test_a_causal_document_longer_than_the_model_is_refused(tmp_path):
    build_tiny_decoder(tmp_path, "qwen3", seed=5)
    engine = Engine(EngineConfig(model=model_config(tmp_path), max_input_tokens=40))
    engine.start()
    try:
        with pytest.raises(InvalidRequest, match="one pass, of at most 40 tokens"):
            run(engine, [long_text(30), long_text(30)])
    finally:
        engine.shutdown()


def windows_reference(model, tok, text: str, *, max_length: int, pooling: str, normalize: bool) -> tuple:
    """``long_input: mean`` written out: the text's tokens in consecutive windows of max - 2, each run as
    [CLS] + window + [SEP] and pooled as the model pools; their mean weighted by each run's tokens; normalised if the
    model does it. Also the tokens counted."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    width = max_length - 2
    rows, weights = [], []
    with torch.no_grad():
        for lo in range(0, len(ids), width):
            run = [tok.cls_token_id] + ids[lo : lo + width] + [tok.sep_token_id]
            hidden = model(input_ids=torch.tensor([run])).last_hidden_state[0]
            rows.append(hidden.mean(0) if pooling == "mean" else hidden[0])
            weights.append(len(run))
    w = torch.tensor(weights, dtype=torch.float32)[:, None]
    v = (torch.stack(rows) * w).sum(0) / w.sum()
    return (F.normalize(v, dim=0) if normalize else v), sum(weights)


def test_long_input_mean_beside_short_inputs_that_stay_as_they_were(minilm, cls_tiny):
    for (engine, model, tok), pooling, normalize in ((minilm, "mean", True), (cls_tiny, "cls", False)):
        texts = ["a short one", long_text(engine.max_length * 2, seed=9), "another short text"]
        got = asyncio.run(engine.embed(texts, EmbedOptions(long_input="mean")))
        plain = asyncio.run(engine.embed(texts))
        for i in (0, 2):
            torch.testing.assert_close(got.vectors[i], plain.vectors[i], atol=1e-6, rtol=1e-5)
            assert got.token_counts[i] == plain.token_counts[i]
        want, tokens = windows_reference(model, tok, texts[1], max_length=engine.max_length, pooling=pooling,
                                         normalize=normalize)
        assert F.cosine_similarity(got.vectors[1], want, dim=0) >= 0.99999
        assert got.token_counts[1] == tokens > engine.max_length
        with pytest.raises(InvalidRequest) as err:
            asyncio.run(engine.embed(texts, EmbedOptions(long_input="error")))
        assert err.value.code == "context_length_exceeded" or "tokens" in err.value.message
        truncated = asyncio.run(engine.embed(texts, EmbedOptions(long_input="truncate"))).vectors
        torch.testing.assert_close(truncated, plain.vectors)

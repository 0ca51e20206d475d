"""The real all-MiniLM-L6-v2: embedserve vs SentenceTransformer(dir).encode on 200+ varied texts."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
import torch.nn.functional as F

from on_device import ON_CUDA, cos_min, model_config
from tiny import mixed_texts
from embedserve.config import EngineConfig
from embedserve.engine.front import Engine

pytestmark = pytest.mark.gpu  # runs on EMBEDSERVE_TEST_DEVICE


def varied_texts() -> list[str]:
    rng = random.Random(7)
    texts = mixed_texts(150, seed=11)
    texts += [
        "",
        " ",
        "a",
        "Hello, World!",
        "HELLO world",  # the tokenizer lower-cases
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines\r\n",
        "Ünïcödé façade naïve café",
        "日本語のテキストを埋め込む",
        "emoji 🙂🚀 and symbols ∑∫√",
        "Ελληνικά κείμενα και русский текст",
        "x" * 3000,  # one long word
        "The quick brown fox jumps over the lazy dog. " * 60,  # far past 256 tokens
        "repeated " * 400,
    ]
    # Exact repeats inside the same batch.
    texts += [texts[3], texts[3], texts[151], texts[151]]
    # Passages of 80-120 words, and documents past the 256-token limit.
    vocab = "retrieval augmented generation uses dense vectors to find relevant passages quickly".split()
    texts += [" ".join(rng.choice(vocab) for _ in range(rng.randint(80, 120))) for _ in range(20)]
    texts += [" ".join(rng.choice(vocab) for _ in range(rng.randint(260, 400))) for _ in range(16)]
    return texts


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    texts = varied_texts()
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    return texts, st.encode(texts, convert_to_tensor=True, batch_size=32)


@pytest.mark.parametrize("dtype", ["float32"] + (["bfloat16", "float16"] if ON_CUDA else []))
def test_parity_with_sentence_transformers_in_mixed_batches(minilm_dir, reference, dtype):
    texts, ref = reference
    assert len(texts) >= 200
    engine = Engine(EngineConfig(model=model_config(minilm_dir, dtype=dtype)))
    engine.start()
    rng = random.Random(3)

    async def run():
        # Requests of random sizes arrive together, so steps mix inputs of many requests.
        order = list(range(len(texts)))
        rng.shuffle(order)
        chunks, i = [], 0
        while i < len(order):
            n = rng.choice([1, 1, 2, 5, 17])
            chunks.append(order[i : i + n])
            i += n
        results = await asyncio.gather(*(engine.embed([texts[j] for j in c]) for c in chunks))
        out = torch.empty_like(ref)
        for c, r in zip(chunks, results):
            out[c] = r.vectors
        return out

    try:
        got = asyncio.run(run())
    finally:
        engine.shutdown()
    cos = F.cosine_similarity(got, ref)
    worst = int(cos.argmin())
    assert cos.min() >= cos_min(dtype), (worst, texts[worst][:80], float(cos.min()))
    assert engine.scheduler.stats.steps < len(texts)  # inputs really were packed together


def test_token_counts_match_the_tokenizer_with_truncation(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = ["", "hello world", "word " * 1000]
    engine = Engine(EngineConfig(model=model_config(minilm_dir)))
    engine.start()
    try:
        result = asyncio.run(engine.embed(texts))
    finally:
        engine.shutdown()
    expected = [len(tok(t, truncation=True, max_length=256)["input_ids"]) for t in texts]
    assert result.token_counts == expected == [2, 4, 256]


@pytest.mark.skipif(ON_CUDA, reason="the CPU's bfloat16 layout (CUDA's is the parametrized parity test)")
def test_cpu_bfloat16_within_09999_of_sentence_transformers(minilm_dir, reference):
    """bf16 on a CPU, whether native or emulated (issue 32's bar: worst cosine >= 0.9999 on these texts): the
    GEMMs and attention run bf16 while the residual stream, norms, embeddings and pooling stay float32 (pure
    bf16 gave 0.99990 here, float32 residuals 0.99996)."""
    from embedserve.config import ModelConfig

    texts, ref = reference
    engine = Engine(EngineConfig(model=ModelConfig(path=str(minilm_dir), device="cpu", dtype="bfloat16")))
    engine.start()
    try:
        got = asyncio.run(engine.embed(texts)).vectors
    finally:
        engine.shutdown()
    cos = F.cosine_similarity(got.float(), ref.float())
    worst = int(cos.argmin())
    assert cos.min() >= 0.9999, (worst, texts[worst][:80], float(cos.min()))
    encoder = engine.model.encoder
    linears = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 24 and {m.weight.dtype for m in linears} == {torch.bfloat16}
    assert {encoder.word_embeddings.weight.dtype, encoder.embed_norm.weight.dtype,
            encoder.layers[0].attn_norm.weight.dtype} == {torch.float32}
    assert engine.dtype == torch.bfloat16

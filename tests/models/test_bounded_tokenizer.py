"""A text costs what the model takes, and still gives transformers' ids: long texts are read window by window up
to the whitespace after the tokens that decide them (issue 24), and a rerank's query is tokenized once."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from embedserve.engine.tokenizer import CHARS_PER_TOKEN, Tokenizer
from embedserve.errors import ContextLengthExceeded, InvalidRequest
from tiny import MINILM_DIR, build_tiny_decoder, use_llama_tokenizer

WORDS = "the quick brown fox jumps over a lazy dog while embeddings of long texts stay exact".split()


def words(n: int, seed: int = 0, sep: str = " ") -> str:
    rng = random.Random(seed)
    return sep.join(rng.choice(WORDS) for _ in range(n))


def long_texts() -> dict[str, str]:
    """Texts far past a MiniLM budget (256 tokens: 4096 characters), in the shapes that could fool a cut."""
    return {
        "words": words(20_000),
        "spaces first": " " * 50_000 + words(2_000),
        "newlines and tabs": words(5_000, sep="\n\t"),
        "no whitespace": words(20_000, sep=","),
        "one endless word": "x" * 100_000,
        "cjk": "".join(chr(0x4E00 + i % 500) for i in range(30_000)),
        "mixed": words(300) + " " * 9_000 + "Ünïcödé " * 3_000,
    }


@pytest.fixture(scope="module")
def minilm():
    return Tokenizer(MINILM_DIR, max_length=256), AutoTokenizer.from_pretrained(str(MINILM_DIR))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tok")
    build_tiny_decoder(path, "llama")
    use_llama_tokenizer(path)
    return Tokenizer(path, max_length=128, cap_to_tokenizer=False), AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("which", ["minilm", "llama"])
def test_long_texts_give_the_ids_of_the_whole_text_truncated(request, which):
    ours, hf = request.getfixturevalue(which)
    for name, text in long_texts().items():
        assert len(text) > CHARS_PER_TOKEN * ours.max_length
        want = hf(text, truncation=True, max_length=ours.max_length)["input_ids"]
        assert ours.encode([text], truncate=True) == [want], name
        cut, longer = ours.bounded(text)
        if longer:
            # Read up to a window past the tokens kept: only whitespace may make the cut longer.
            assert len(cut) < len(text) and len(cut.replace(" ", "")) <= 2 * CHARS_PER_TOKEN * ours.max_length, name


def test_an_over_long_text_is_refused_from_what_was_read(minilm):
    ours, hf = minilm
    with pytest.raises(ContextLengthExceeded, match=r"requested at least \d+ tokens in input\[1\]") as e:
        ours.encode(["short", words(200_000)], truncate=False)
    assert e.value.requested > 256
    # Within the budget the count is exact, as before.
    exact = len(hf(words(400))["input_ids"])
    with pytest.raises(ContextLengthExceeded, match=rf"requested {exact} tokens in input\[0\]"):
        ours.encode([words(400)], truncate=False)


def test_pairs_match_transformers_pair_truncation_whatever_is_long(minilm):
    ours, hf = minilm
    # Both past the budget (4096 characters), short enough that transformers' own pair truncation (which keeps
    # every overflow piece of both) stays affordable as the reference.
    short, long_a, long_b = "what is a fox", words(1_200, seed=1), words(1_250, seed=2)
    assert min(len(long_a), len(long_b)) > ours.char_budget
    cases = [(short, long_a), (long_a, short), (long_a, long_b), (long_b, long_a), (long_a, long_a)]
    got, starts = ours.encode_pairs(cases, truncate=True)
    for (q, d), ids, start in zip(cases, got, starts):
        enc = hf(q, d, truncation=True, max_length=256)
        assert ids == enc["input_ids"]
        assert start == enc["token_type_ids"].index(1)
    with pytest.raises(ContextLengthExceeded, match=r"at least .* in input\[0\]"):
        ours.encode_pairs([(short, long_a)], truncate=False)


def test_a_rerank_query_is_read_once_for_all_its_documents(minilm, monkeypatch):
    ours, _ = minilm
    seen = []
    bounded = ours.bounded
    monkeypatch.setattr(ours, "bounded", lambda text, tokens=None: seen.append(len(text)) or bounded(text, tokens))
    query = words(10_000)
    ours.encode_pairs([(query, f"document {i}") for i in range(200)], truncate=True)
    assert seen.count(len(query)) == 1 and len(seen) == 201


def test_tokenize_and_decode_take_the_same_limits(minilm):
    ours, hf = minilm
    assert [t[0] for t in ours.tokens([words(100)])[0]] == hf(words(100))["input_ids"]
    with pytest.raises(ContextLengthExceeded, match=r"input\[1\]"):
        ours.tokens(["fine", words(2_000_000 // 6)])
    with pytest.raises(InvalidRequest, match=r"more than 150 tokens \(input\[1\] passes it\)"):
        ours.tokens([words(100), words(100)], max_total=150)
    assert ours.decode([[1037, 1038]]) == ["a b"]
    with pytest.raises(ContextLengthExceeded, match=r"requested 300 tokens in input\[0\]"):
        ours.decode([[1037] * 300])


def test_max_tokens_per_doc_cuts_where_the_whole_text_would(minilm):
    ours, hf = minilm
    for text in (words(50_000), "," * 80_000 + " end"):
        (cut,) = ours.cut([text], 10)
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert hf(cut, add_special_tokens=False)["input_ids"] == ids[:10]

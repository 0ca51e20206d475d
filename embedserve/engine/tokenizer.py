"""The model's fast tokenizer, used the way sentence-transformers uses it.

Two copies of the Rust tokenizer are kept: one that truncates to the model's maximum exactly as
transformers' ``truncation=True`` does (the default path), and one that never truncates (to learn an
input's real length for the error that refuses over-long input when truncation is off). Neither is mutated
after construction, so the tokenisation pool's threads may share them.

A text's cost is bounded by what the model takes, not by its size: a text longer than its character budget
(:data:`CHARS_PER_TOKEN` per token the model takes) is read window by window, each cut at a whitespace, until
more tokens than the model takes are found; only the text up to the whitespace after them is tokenized (the
Rust tokenizer otherwise keeps every token past the cut, as overflow pieces). Tokenizers split words at
whitespace, so the tokens kept are those of the whole text.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Encoding
from tokenizers import Tokenizer as RustTokenizer

from embedserve.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 16  # a text's character budget per token the model takes; past it, read window by window
_SPACES = (" ", "\n", "\t", "\r")  # where BERT-style tokenizers split words
_MARGIN = 16  # tokens read past those decided, against the few a window's start may count differently


class Abandoned(Exception):
    """The request whose texts these are was cancelled (its client went away): stop reading them."""


_work = threading.local()  # the tokenisation pool thread's current request: its "abandoned" event


def run_abandonable(abandoned: threading.Event, fn, *args):
    """``fn(*args)`` on this thread, stopping between windows of long texts once ``abandoned`` is set."""
    _work.abandoned = abandoned
    try:
        return fn(*args)
    finally:
        _work.abandoned = None


def _check_abandoned() -> None:
    event = getattr(_work, "abandoned", None)
    if event is not None and event.is_set():
        raise Abandoned


def _last_space(text: str, start: int, end: int, spaces: Sequence[str]) -> int:
    """The last of ``spaces`` in ``text[start:end]`` (-1: none)."""
    return max(text.rfind(c, start, end) for c in spaces)


def _next_space(text: str, start: int, spaces: Sequence[str]) -> int:
    """The first of ``spaces`` at or after ``start`` (-1: none)."""
    found = [i for i in (text.find(c, start) for c in spaces) if i >= 0]
    return min(found) if found else -1


class Tokenizer:
    def __init__(
        self, directory: Path, *, max_length: int, do_lower_case: bool = False, cap_to_tokenizer: bool = True
    ) -> None:
        # transformers resolves tokenizer_config.json, added tokens and the post-processor; we only
        # keep its Rust backend.
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(directory), use_fast=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types here; all mean "cannot tokenize"
            raise ModelLoadError(f"cannot load a tokenizer from {directory}: {e}") from e
        if not getattr(hf, "is_fast", False):
            raise ModelLoadError(f"{directory} has no fast (Rust) tokenizer; add a tokenizer.json")
        # sentence-transformers' max_seq_length, when the folder sets one, wins over the tokenizer's own limit.
        tokenizer_max = getattr(hf, "model_max_length", None)
        if cap_to_tokenizer and isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
            max_length = min(max_length, tokenizer_max)
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.vocab_size = len(hf)
        self.pad_token_id = hf.pad_token_id
        self.special_ids = frozenset(hf.all_special_ids)
        # What bge-m3's lexical weights leave out (FlagEmbedding's rule): the CLS, EOS, padding and unknown tokens.
        self.unweighted_ids = frozenset(i for i in (hf.cls_token_id, hf.eos_token_id, hf.pad_token_id,
                                                    hf.unk_token_id) if i is not None)

        self._hf = hf  # renders chat templates (a chat-template reranker's pairs); the Rust copies tokenize
        serialized = hf.backend_tokenizer.to_str()
        self._full = RustTokenizer.from_str(serialized)
        self._full.no_truncation()
        self._full.no_padding()
        self._cut = RustTokenizer.from_str(serialized)
        self._cut.no_padding()
        self._cut.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        self._cut_start = RustTokenizer.from_str(serialized)  # keeps the end (Cohere's truncate: START)
        self._cut_start.no_padding()
        self._cut_start.enable_truncation(max_length=max_length, strategy="longest_first", direction="left")
        self._cuts: dict[int, RustTokenizer] = {}  # truncating copies for lower limits (_cut_to)
        self.num_special = len(self._full.encode("", add_special_tokens=True).ids)
        pre = self._full.pre_tokenizer
        self._pieces = pre.pre_tokenize_str if pre is not None else (lambda text: [(text, (0, len(text)))])
        # Where words end for this tokenizer: every tokenizer splits at a space; newlines and tabs only count
        # where the pre-tokenizer drops them (BERT); SentencePiece keeps them inside its pieces.
        self._spaces = _SPACES if [p for p, _ in self._pieces("a\n\tb")] == ["a", "b"] else (" ",)

    @functools.cached_property
    def ends(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (BERT: [CLS] and [SEP]; none for a
        tokenizer that adds none)."""
        bare = self._full.encode("a", add_special_tokens=False).ids
        full = self._full.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return full[:i], full[i + len(bare) :]
        raise ModelLoadError("the tokenizer's special tokens do not wrap a text's own tokens: late chunking cannot "
                             "tell its start and end tokens apart")

    def plain(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens without special tokens, never truncated (the caller bounds the characters)."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self._full.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def char_budget(self) -> int:
        """Characters of a text read at once; a longer text is read window by window (:meth:`bounded`)."""
        return CHARS_PER_TOKEN * self.max_length

    def bounded(self, text: str, tokens: int | None = None) -> tuple[str, bool]:
        """(the part of ``text`` that decides its first ``tokens`` tokens, whether it holds more than that).
        ``tokens``: the model's maximum by default. The text itself when it is within its budget (or holds hardly
        more than that many tokens); else its start, cut at the first word end a few tokens past them (special
        tokens not counted), found window by window so that no more than a window is ever tokenized at once."""
        tokens = self.max_length if tokens is None else tokens
        if len(text) <= self.char_budget:
            return text, False
        seen, want = 0, tokens + _MARGIN
        for start, end, e in self._windows(text):
            if seen + len(e.ids) > want:
                stop = start + min(e.offsets[want - seen][1], end - start)  # the end of the token past them
                space = _next_space(text, stop, self._spaces)
                # No whitespace after it in this window (one endless word): the window's end is the cut.
                return text[: space if 0 <= space < end else end], True
            seen += len(e.ids)
        return text, False

    def bounded_tail(self, text: str) -> str:
        """The end of ``text`` that decides its last ``max_length`` tokens: the text itself within its budget;
        else a tail starting at a word boundary, doubled until it holds a margin more tokens than that (the
        tokens at its start, which may split differently from the whole text's, are the ones truncation drops),
        so that no more than about twice what is kept is ever tokenized."""
        size = self.char_budget
        while size < len(text):
            _check_abandoned()
            start = len(text) - size
            space = _next_space(text, start, self._spaces)
            tail = text[space if start <= space < start + size // 2 else start :]
            read = tail.lower() if self.do_lower_case else tail
            if len(self._full.encode(read, add_special_tokens=False).ids) > self.max_length + _MARGIN:
                return tail
            size *= 2
        return text

    def use_template(self, prefix: str, suffix: str) -> None:
        """Pairs become ``prefix`` + the formatted middle + ``suffix`` (a causal-LM reranker's prompt): the fixed
        parts are tokenized once, and the middle is cut to what is left of the maximum. Called once, before
        serving."""
        self._prefix = self._full.encode(prefix, add_special_tokens=False).ids
        self._suffix = self._full.encode(suffix, add_special_tokens=False).ids
        room = self.max_length - len(self._prefix) - len(self._suffix)
        if room < self.num_special + 1:
            raise ModelLoadError(f"the reranker's prompt takes {self.max_length - room} of the "
                                 f"{self.max_length} tokens the model takes: nothing is left for a pair")
        self._middle = RustTokenizer.from_str(self._full.to_str())
        self._middle.enable_truncation(max_length=room, strategy="longest_first", direction="right")

    def encode_templated(self, middles: Sequence[str], *, truncate: bool) -> list[list[int]]:
        """:meth:`use_template`'s prompt around each text (the middle, with the tokenizer's special tokens)."""
        encoder = self._middle if truncate else self._full
        out = []
        for i, e in enumerate(encoder.encode_batch(list(middles), add_special_tokens=True)):
            ids = self._prefix + e.ids + self._suffix
            if len(ids) > self.max_length:
                raise ContextLengthExceeded(self.max_length, len(ids), index=i)
            out.append(ids)
        return out

    def use_chat_template(self, kwargs: dict, system: str | None, restore_suffix: bool) -> None:
        """Pairs become the tokenizer's chat template rendered over ``[system?, query, document]`` messages, as
        sentence-transformers 6 formats a causal-LM CrossEncoder's pairs: tokenized without special tokens, cut
        at the right to the maximum, and a cut pair's last tokens overwritten with the template's tail (learnt
        here from two renders with different fillers). Called once, before serving."""
        if not getattr(self._hf, "chat_template", None):
            raise ModelLoadError("this reranker formats pairs with a chat template, but its tokenizer has none "
                                 "(chat_template.jinja or tokenizer_config.json's chat_template)")
        self._chat = (dict(kwargs), system)
        probe = self._render([("QUERY_PROBE_7", "DOCUMENT_PROBE_7")])[0]
        if "QUERY_PROBE_7" not in probe or "DOCUMENT_PROBE_7" not in probe:
            raise ModelLoadError("this reranker's chat template does not render a 'query' and a 'document' "
                                 "message; sentence-transformers would refuse it too")
        self._chat_suffix: list[int] = []
        if restore_suffix:
            first, second = (self._full.encode(r, add_special_tokens=False).ids
                             for r in self._render([("0", "0"), ("1 2 3 4", "1 2 3 4")]))
            common = 0
            while common < min(len(first), len(second)) and first[-1 - common] == second[-1 - common]:
                common += 1
            if 0 < common < min(len(first), len(second)):
                self._chat_suffix = first[len(first) - common:]

    def _render(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        kwargs, system = self._chat
        head = [{"role": "system", "content": system}] if system is not None else []
        conversations = [head + [{"role": "query", "content": q}, {"role": "document", "content": d}]
                         for q, d in pairs]
        return self._hf.apply_chat_template(conversations, tokenize=False, **kwargs)

    def encode_chat(self, pairs: Sequence[tuple[str, str]], *, truncate: bool) -> list[list[int]]:
        """:meth:`use_chat_template`'s format for each (query, document) pair."""
        out = []
        for i, e in enumerate(self._full.encode_batch(self._render(pairs), add_special_tokens=False)):
            ids = e.ids
            if len(ids) > self.max_length:
                if not truncate:
                    raise ContextLengthExceeded(self.max_length, len(ids), index=i)
                ids = ids[: self.max_length]
            if len(ids) == self.max_length and self._chat_suffix:
                keep = min(len(self._chat_suffix), len(ids))
                ids[len(ids) - keep:] = self._chat_suffix[-keep:]
            out.append(ids)
        return out

    def tokens(self, texts: Sequence[str], *, add_special_tokens: bool = True, max_total: int | None = None
               ) -> list[list[tuple]]:
        """Per text, each token as (id, text, special, start, stop): the text a token covers (its own string
        for special tokens, whose start and stop are None), character offsets into the given text. A text of
        more tokens than the model takes is refused, as for embedding it with truncation off; so is an answer
        of more than ``max_total`` tokens in all (counted as it is built)."""
        out, total = [], 0
        for i, text in enumerate(texts):
            if self.bounded(text)[1]:
                raise ContextLengthExceeded(self.max_length, self.max_length + 1, index=i, at_least=True)
            e = self._full.encode(text, add_special_tokens=add_special_tokens)
            content = len(e.ids) - sum(e.special_tokens_mask)
            if content > self.max_length:
                raise ContextLengthExceeded(self.max_length, content, index=i)
            total += len(e.ids)
            if max_total is not None and total > max_total:
                raise InvalidRequest(f"the answer would hold more than {max_total} tokens (input[{i}] passes it); "
                                     "send fewer texts per request", param="inputs")
            row = []
            for tid, tok, special, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets):
                row.append((tid, tok, True, None, None) if special else (tid, text[a:b], False, a, b))
            out.append(row)
        return out

    def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """Token ids back to text; an id list longer than the model's maximum is refused."""
        for i, x in enumerate(ids):
            if len(x) > self.max_length:
                raise ContextLengthExceeded(self.max_length, len(x), index=i)
        return self._full.decode_batch([list(x) for x in ids], skip_special_tokens=skip_special_tokens)

    def cut(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (special tokens not counted), at the character
        where that token ends: Cohere's ``max_tokens_per_doc``."""
        if max_tokens >= self.max_length:
            return list(texts)  # the pair's own truncation keeps fewer of a document's tokens than that
        out = []
        for text in texts:
            head, _ = self.bounded(text, max_tokens)
            e = self._full.encode(head, add_special_tokens=False)
            out.append(text[: e.offsets[max_tokens - 1][1]] if len(e.ids) > max_tokens else text)
        return out

    def _window_end(self, text: str, start: int) -> int:
        """Where the window of ``text`` that starts at ``start`` ends: at its last whitespace (which starts the
        next window, so that no word is split between two), else where the tokenizer's own pre-tokenizer
        starts its last piece (punctuation, scripts without spaces); one endless word is cut at the budget."""
        end = min(len(text), start + self.char_budget)
        if end == len(text):
            return end
        if (space := _last_space(text, start + 1, end, self._spaces)) > start:
            return space
        pieces = self._pieces(text[start:end])
        if len(pieces) > 1 and pieces[-1][1][0] > 0:
            return start + pieces[-1][1][0]
        return end

    def _windows(self, text: str) -> Iterator[tuple[int, int, Encoding]]:
        """``text`` window by window: (start, end, its tokens without special tokens), lower-cased where the
        model says so; a cancelled request stops here between windows."""
        start = 0
        while start < len(text):
            _check_abandoned()
            end = self._window_end(text, start)
            window = text[start:end]
            yield start, end, self._full.encode(window.lower() if self.do_lower_case else window,
                                                add_special_tokens=False)
            start = end

    def count(self, text: str) -> int:
        """Tokens in ``text`` (special tokens not counted), read window by window: memory stays bounded."""
        return sum(len(e.ids) for _, _, e in self._windows(text))

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], *, truncate: bool) -> tuple[list[list[int]], list[int]]:
        """A cross-encoder's (query, document) pairs as one sequence each, with special tokens, cut as
        transformers' ``truncation=True`` cuts a pair (longest first: the longer text loses tokens until both
        fit, so a short query is kept whole). Also returns where each pair's second text starts (its token
        type 1), from the tokenizer's own type ids.

        Each distinct text is tokenized once, up to what decides its tokens (a rerank's query once for all its
        documents), and the pairs are joined from those tokens by the tokenizer's own truncation and template."""
        read: dict[str, tuple[Encoding, bool]] = {}

        def tokens(text: str) -> tuple[Encoding, bool]:
            if text not in read:
                cut, longer = self.bounded(text)
                e = self._full.encode(cut.lower() if self.do_lower_case else cut, add_special_tokens=False)
                read[text] = (e, longer)
            return read[text]

        joiner = self._cut if truncate else self._full
        ids, starts = [], []
        for i, (q, d) in enumerate(pairs):
            _check_abandoned()
            (eq, q_cut), (ed, d_cut) = tokens(q), tokens(d)
            if q_cut and d_cut and truncate:
                eq, ed = self._keep_longer(q, d, eq, ed)
            e = joiner.post_process(eq, ed, add_special_tokens=True)
            if not truncate and (len(e.ids) > self.max_length or q_cut or d_cut):
                raise ContextLengthExceeded(self.max_length, len(e.ids), index=i, at_least=q_cut or d_cut)
            ids.append(e.ids)
            starts.append(next((j for j, t in enumerate(e.type_ids) if t), len(e.ids)))
        return ids, starts

    def _keep_longer(self, q: str, d: str, eq: Encoding, ed: Encoding) -> tuple[Encoding, Encoding]:
        """Both texts of a pair were cut: longest-first truncation gives the longer one the odd token, so the
        cut ones must stay in the whole texts' order. Counted window by window (bounded memory)."""
        nq, nd = self.count(q), self.count(d)
        short = self.max_length  # both cuts hold more than this
        lq, ld = (short + 1, short) if nq > nd else (short, short + 1) if nd > nq else (short, short)
        out = []
        for e, n in ((eq, lq), (ed, ld)):
            e = Encoding.merge([e], growing_offsets=False)  # a copy: the read text's tokens are shared
            e.truncate(n)
            out.append(e)
        return out[0], out[1]

    def _cut_to(self, limit: int) -> RustTokenizer:
        """A copy that truncates to ``limit`` tokens (a ColBERT model's query and document lengths)."""
        if limit not in self._cuts:
            cut = RustTokenizer.from_str(self._hf.backend_tokenizer.to_str())
            cut.no_padding()
            cut.enable_truncation(max_length=limit, strategy="longest_first", direction="right")
            self._cuts[limit] = cut
        return self._cuts[limit]

    def encode(self, texts: Sequence[str], *, truncate: bool, from_start: bool = False, long_ok: bool = False,
               special: bool = True, limit: int | None = None) -> list[list[int] | None]:
        """Token ids with special tokens for each text; over-long ones truncated, refused, or (``long_ok``) None.
        ``from_start``: an over-long text loses its start instead of its end (transformers'
        ``truncation_side="left"``): the special tokens, then its last tokens. ``special=False``: without special
        tokens (what a static query encoder reads). ``limit``: fewer tokens than the model's maximum."""
        limit = self.max_length if limit is None else min(limit, self.max_length)
        if truncate and from_start:
            if limit != self.max_length:
                raise ValueError("this is a bug: a limit below the maximum keeps the start of a text")
            tails = [self.bounded_tail(t) for t in texts]
            if self.do_lower_case:
                tails = [t.lower() for t in tails]
            return [e.ids for e in self._cut_start.encode_batch(tails, add_special_tokens=special)]
        cut = [self.bounded(t, limit) for t in texts]
        texts = [t for t, _ in cut]
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        if truncate:  # one pass: the truncating tokenizer cuts exactly as transformers' truncation=True
            cutter = self._cut if limit == self.max_length else self._cut_to(limit)
            return [e.ids for e in cutter.encode_batch(texts, add_special_tokens=special)]
        ids = [e.ids for e in self._full.encode_batch(texts, add_special_tokens=special)]
        for i, x in enumerate(ids):
            if len(x) > limit:
                if not long_ok:
                    raise ContextLengthExceeded(limit, len(x), index=i, at_least=cut[i][1])
                ids[i] = None  # the caller reads it whole another way
        return ids

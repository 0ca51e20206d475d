"""The model's fast tokenizer, used the way sentence-transformers uses it.

Two copies of the Rust tokenizer are kept: one that truncates to the model's maximum exactly as
transformers' ``truncation=True`` does (the default path), and one that never truncates (to learn an
input's real length for the error that refuses over-long input when truncation is off). Neither is mutated after construction, so the tokenisation pool's
threads may share them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer as RustTokenizer

from embedserve.errors import ContextLengthExceeded, ModelLoadError

log = logging.getLogger(__name__)


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

        self._hf = hf  # renders chat templates (a chat-template reranker's pairs); the Rust copies tokenize
        serialized = hf.backend_tokenizer.to_str()
        self._full = RustTokenizer.from_str(serialized)
        self._full.no_truncation()
        self._full.no_padding()
        self._cut = RustTokenizer.from_str(serialized)
        self._cut.no_padding()
        self._cut.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
        self.num_special = len(self._full.encode("", add_special_tokens=True).ids)

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

    def tokens(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[tuple]]:
        """Per text, each token as (id, text, special, start, stop): the text a token covers (its own string
        for special tokens, whose start and stop are None), character offsets into the given text."""
        out = []
        for text, e in zip(texts, self._full.encode_batch(list(texts), add_special_tokens=add_special_tokens)):
            row = []
            for tid, tok, special, (a, b) in zip(e.ids, e.tokens, e.special_tokens_mask, e.offsets):
                row.append((tid, tok, True, None, None) if special else (tid, text[a:b], False, a, b))
            out.append(row)
        return out

    def decode(self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        return self._full.decode_batch([list(x) for x in ids], skip_special_tokens=skip_special_tokens)

    def cut(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens (special tokens not counted), at the character
        where that token ends: Cohere's ``max_tokens_per_doc``."""
        out = []
        for text, e in zip(texts, self._full.encode_batch(list(texts), add_special_tokens=False)):
            out.append(text[: e.offsets[max_tokens - 1][1]] if len(e.ids) > max_tokens else text)
        return out

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], *, truncate: bool) -> tuple[list[list[int]], list[int]]:
        """A cross-encoder's (query, document) pairs as one sequence each, with special tokens, cut as
        transformers' ``truncation=True`` cuts a pair (longest first: the longer text loses tokens until both
        fit, so a short query is kept whole). Also returns where each pair's second text starts (its token
        type 1), from the tokenizer's own type ids."""
        if self.do_lower_case:
            pairs = [(q.lower(), d.lower()) for q, d in pairs]
        encodings = (self._cut if truncate else self._full).encode_batch(list(pairs), add_special_tokens=True)
        ids, starts = [], []
        for i, e in enumerate(encodings):
            if not truncate and len(e.ids) > self.max_length:
                raise ContextLengthExceeded(self.max_length, len(e.ids), index=i)
            ids.append(e.ids)
            starts.append(next((j for j, t in enumerate(e.type_ids) if t), len(e.ids)))
        return ids, starts

    def encode(self, texts: Sequence[str], *, truncate: bool) -> list[list[int]]:
        """Token ids with special tokens for each text; over-long ones truncated or refused."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        if truncate:  # one pass: the truncating tokenizer cuts exactly as transformers' truncation=True
            return [e.ids for e in self._cut.encode_batch(list(texts), add_special_tokens=True)]
        ids = [e.ids for e in self._full.encode_batch(list(texts), add_special_tokens=True)]
        for i, x in enumerate(ids):
            if len(x) > self.max_length:
                raise ContextLengthExceeded(self.max_length, len(x), index=i)
        return ids

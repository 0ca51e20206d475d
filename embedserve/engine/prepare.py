"""Input preparation, on the tokenisation pool: a request's texts (with their prompt), token ids or (query,
document) pairs -> token ids the model can take, or a 400 that says which input is wrong and why.

Texts are cut to the model's maximum or refused (``truncate``); ids are checked against the embedding table (on
CUDA an id past it is a device-side assert that would take the process down); OpenAI's cl100k ids are decoded to
text first (``--token-ids cl100k``).
"""

from __future__ import annotations

from typing import Sequence

from embedserve.engine.loading import Loaded
from embedserve.engine.token_ids import cl100k
from embedserve.errors import ContextLengthExceeded, InvalidRequest, quoted
from embedserve.models.classifier import ChatTemplate


class Preparer:
    def __init__(self, loaded: Loaded, *, token_ids: str) -> None:
        """``token_ids``: how token-id inputs are read: cl100k (decoded to text) or model (used as given)."""
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.template = loaded.model.classifier.template if loaded.model.classifier is not None else None
        self.max_length = loaded.max_length
        self.id_limit = loaded.id_limit
        self.text_ids_may_overflow = loaded.text_ids_may_overflow
        self.token_ids = token_ids

    @property
    def spec(self):
        return self.model.spec  # prompts configured at load replace the folder's spec

    def pairs(self, pairs: Sequence[tuple[str, str | None]], truncate: bool, max_doc_tokens: int | None
              ) -> tuple[list[list[int]], list[int]]:
        """(query, document) pairs, or single texts (None as the document) -> (ids, where each second text
        starts). ``max_doc_tokens``: each document cut to that many tokens first."""
        if max_doc_tokens is not None and all(d is not None for _, d in pairs):
            docs = self.tokenizer.cut([d for _, d in pairs], max_doc_tokens)
            pairs = [(q, d) for (q, _), d in zip(pairs, docs)]
        singles = [i for i, (_, d) in enumerate(pairs) if d is None]
        if singles and len(singles) != len(pairs):
            raise InvalidRequest("inputs must be all single texts or all pairs, not a mix", param="inputs")
        template = self.template
        if template is not None:
            if singles:
                raise InvalidRequest("this reranker scores (query, document) pairs, not single texts", param="inputs")
            # Each text only up to what decides its tokens: the prompt never holds more of a query than that.
            read: dict[str, str] = {}
            for text in {t for pair in pairs for t in pair}:
                read[text] = self.tokenizer.bounded(text)[0]
            pairs = [(read[q], read[d]) for q, d in pairs]
            if isinstance(template, ChatTemplate):
                ids = self.tokenizer.encode_chat(pairs, truncate=truncate)
            else:
                ids = self.tokenizer.encode_templated(
                    [template.middle.format(query=q, document=d) for q, d in pairs], truncate=truncate)
            starts = [len(x) for x in ids]
        elif singles:
            ids = self.tokenizer.encode([q for q, _ in pairs], truncate=truncate)
            starts = [len(x) for x in ids]
        else:
            ids, starts = self.tokenizer.encode_pairs(pairs, truncate=truncate)
        if self.text_ids_may_overflow:
            for i, x in enumerate(ids):
                if any(t >= self.id_limit for t in x):
                    raise InvalidRequest(f"input {i} tokenizes to an id past the served model's embedding table",
                                         param="documents")
        return ids, starts

    def prompt(self, name: str | None) -> str:
        """The text of one of the model's prompts (None: its default prompt, if any); unknown is a 400."""
        spec = self.spec
        name = name if name is not None else spec.default_prompt_name
        if name is None:
            return ""
        if name not in spec.prompts:
            known = ", ".join(sorted(spec.prompts)) or "none"
            raise InvalidRequest(f"unknown prompt_name {quoted(name)}; this model's prompts: {known}",
                                 param="prompt_name")
        return spec.prompts[name]

    def texts(self, inputs: Sequence[str | Sequence[int]], truncate: bool, prompt: str = "",
              from_start: bool = False) -> list[list[int]]:
        """A request's input: texts (each after ``prompt``) or token-id lists -> token ids. ``from_start``: an
        over-long input loses its start rather than its end."""
        texts = [x for x in inputs if isinstance(x, str)]
        if texts and len(texts) != len(inputs):
            raise InvalidRequest("input must be all strings or all token-id lists, not a mix", param="input")
        if not texts:
            # Checked here, on the tokenisation pool: a request may carry millions of ids.
            for i, x in enumerate(inputs):
                if not x:
                    raise InvalidRequest(f"input[{i}] is an empty token-id array", param="input")
                if not all(type(t) is int for t in x):  # JSON true/false are bools, not token ids
                    raise InvalidRequest(f"input[{i}] must be an array of integer token ids", param="input")
        if not texts and self.token_ids == "cl100k":
            decoder = cl100k()
            texts = [decoder.decode(list(x), index=i) for i, x in enumerate(inputs)]
        if texts:
            if prompt:
                texts = [prompt + t for t in texts]
            ids = self.tokenizer.encode(texts, truncate=truncate, from_start=from_start)
            if self.text_ids_may_overflow:
                rows = self.id_limit
                for i, x in enumerate(ids):
                    bad = next((t for t in x if t >= rows), None)
                    if bad is not None:
                        raise InvalidRequest(
                            f"input[{i}] tokenizes to id {bad}, past the {rows} rows of the served model's "
                            "embedding table (its tokenizer knows more tokens than its weights)", param="input",
                        )
            return ids
        if prompt:
            raise InvalidRequest(
                "a prompt cannot be applied to token ids in the model's vocabulary; send text", param="prompt_name"
            )
        out = []
        vocab = self.id_limit  # the tokenizer's tokens that the embedding table has rows for
        for i, x in enumerate(inputs):
            x = list(x)
            bad = next((t for t in x if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{i}] has token id {bad}, outside the served model's vocabulary (0..{vocab - 1}) "
                    "that this server reads token ids in. If you send OpenAI (tiktoken cl100k_base) ids, start "
                    "the server with --token-ids cl100k (EMBEDSERVE_TOKEN_IDS=cl100k).",
                    param="input",
                )
            if len(x) > self.max_length:
                if not truncate:
                    raise ContextLengthExceeded(self.max_length, len(x), index=i)
                x = x[-self.max_length :] if from_start else x[: self.max_length]
            out.append(x)
        return out

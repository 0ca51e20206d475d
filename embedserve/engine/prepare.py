"""Input preparation, on the tokenisation pool: a request's texts (with their prompt), token ids or (query,
document) pairs -> token ids the model can take, or a 400 that says which input is wrong and why.

Texts are cut to the model's maximum or refused (``truncate``); ids are checked against the embedding table (on
CUDA an id past it is a device-side assert that would take the process down); OpenAI's cl100k ids are decoded to
text first (``--token-ids cl100k``). A late-chunked request's texts become one document (:mod:`.late`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from embedserve.engine import late
from embedserve.engine.loading import Loaded
from embedserve.engine.token_ids import cl100k
from embedserve.errors import ContextLengthExceeded, InvalidRequest, quoted
from embedserve.models.classifier import ChatTemplate

# A late-chunked document is read whole: at most this many times the characters of one input's window.
LATE_DOCUMENT_WINDOWS = 64


@dataclass(frozen=True)
class ColbertInputs:
    """A PyLate model's inputs: their ids and, per input, its hidden tail (query expansion tokens that no token
    attends to; 0 for none)."""

    ids: list[list[int]]
    tails: list[int]


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

    def windows(self, inputs: Sequence[str | Sequence[int]], prompt: str) -> tuple[list[list[int]], list[int]]:
        """``long_input: mean``: each input as :meth:`texts` makes it when it fits; an over-long text cut into
        consecutive windows of ``max - start and end tokens`` of its tokens, each run as start + window + end.
        Returns the runs and, for each, the input it belongs to."""
        texts = self._read(inputs)
        if texts is None:
            raise InvalidRequest("long_input mean cuts texts into windows: send text, not the model's token ids",
                                 param="long_input")
        ids = self.texts(texts, False, prompt, long_ok=True)
        start, end = self.tokenizer.ends
        width = self.max_length - len(start) - len(end)
        limit = LATE_DOCUMENT_WINDOWS * self.tokenizer.char_budget
        runs, owners = [], []
        for i, x in enumerate(ids):
            if x is not None:
                runs.append(x)
                owners.append(i)
                continue
            if len(prompt) + len(texts[i]) > limit:
                raise InvalidRequest(f"input[{i}] holds {len(texts[i])} characters; long_input mean reads at most "
                                     f"{limit} for one input of this model", param="input")
            tokens = self.tokenizer.plain([prompt + texts[i]])[0]
            for lo in range(0, len(tokens), width):
                runs.append(start + tokens[lo : lo + width] + end)
                owners.append(i)
        self._check_rows(runs, owners)
        return runs, owners

    def _check_rows(self, ids: Sequence[Sequence[int] | None], owners: Sequence[int] | None = None) -> None:
        """A tokenizer that knows more tokens than the embedding table has rows: any such id is a 400."""
        if not self.text_ids_may_overflow:
            return
        rows = self.id_limit
        for i, x in enumerate(ids):
            bad = next((t for t in x or () if t >= rows), None)
            if bad is not None:
                raise InvalidRequest(
                    f"input[{owners[i] if owners else i}] tokenizes to id {bad}, past the {rows} rows of the served "
                    "model's embedding table (its tokenizer knows more tokens than its weights)", param="input",
                )

    def _read(self, inputs: Sequence[str | Sequence[int]]) -> list[str] | None:
        """The input as texts: texts as they are, OpenAI's cl100k ids decoded to the text they encode; None for ids
        in the model's own vocabulary (--token-ids model). Ids are checked first: each a non-empty list of ints."""
        texts = [x for x in inputs if isinstance(x, str)]
        if texts and len(texts) != len(inputs):
            raise InvalidRequest("input must be all strings or all token-id lists, not a mix", param="input")
        if texts:
            return texts
        # Checked here, on the tokenisation pool: a request may carry millions of ids.
        for i, x in enumerate(inputs):
            if not x:
                raise InvalidRequest(f"input[{i}] is an empty token-id array", param="input")
            if not all(type(t) is int for t in x):  # JSON true/false are bools, not token ids
                raise InvalidRequest(f"input[{i}] must be an array of integer token ids", param="input")
        if self.token_ids != "cl100k":
            return None
        decoder = cl100k()
        return [decoder.decode(list(x), index=i) for i, x in enumerate(inputs)]

    def document(self, inputs: Sequence[str | Sequence[int]], prompt: str, overlap: int) -> late.Plan:
        """A late-chunked request: its inputs are one document's consecutive chunks (texts) -> the runs and
        spans of :func:`embedserve.engine.late.plan`."""
        if not all(isinstance(x, str) for x in inputs):
            raise InvalidRequest("late_chunking joins texts into one document: send the chunks as strings, not "
                                 "token ids", param="late_chunking")
        limit = LATE_DOCUMENT_WINDOWS * self.tokenizer.char_budget
        chars = len(prompt) + sum(len(x) for x in inputs)
        if chars > limit:
            raise InvalidRequest(f"the late-chunked document holds {chars} characters; this server reads at most "
                                 f"{limit} for one document of this model", param="input")
        start, end = self.tokenizer.ends
        return late.plan(self.tokenizer.plain(list(inputs)), prompt=self.tokenizer.plain([prompt])[0] if prompt
                         else [], start=start, end=end, max_length=self.max_length, overlap=overlap,
                         windows=not self.model.encoder.causal)

    def colbert(self, inputs: Sequence[str | Sequence[int]], truncate: bool, prompt: str, query: bool
                ) -> ColbertInputs:
        """A PyLate model's queries or documents, as ``ColBERT.tokenize`` makes them: each text (after ``prompt``,
        stripped) cut to the side's length less one (or refused, as ``truncate`` says), its prefix token inserted
        after the first token; queries, with query expansion, padded with [MASK] to the query length."""
        texts = self._read(inputs)
        if texts is None:
            raise InvalidRequest("a ColBERT model inserts its query or document token into each text: send text, "
                                 "not the model's token ids", param="input")
        vectors = self.model.colbert
        spec, tokens = vectors.pylate, vectors.tokens
        prefix = tokens.query_prefix if query else tokens.document_prefix
        room = (spec.query_length if query else spec.document_length) - (prefix is not None)
        ids = self.tokenizer.encode([(prompt + t).strip() for t in texts], truncate=truncate, limit=room)
        tails = [0] * len(ids)
        if query and spec.do_query_expansion:
            pads = [room - len(x) for x in ids]
            ids = [x + [tokens.expansion] * n for x, n in zip(ids, pads)]
            if spec.hidden_expansion:
                tails = pads
        if prefix is not None:
            ids = [x[:1] + [prefix] + x[1:] for x in ids]
        self._check_rows(ids)
        return ColbertInputs(ids, tails)

    def bare(self, inputs: Sequence[str | Sequence[int]], truncate: bool, prompt: str) -> list[list[int]]:
        """Texts (each after ``prompt``) as token ids without special tokens: an inference-free SPLADE model's
        queries. Token-id inputs as :meth:`texts` takes them."""
        texts = self._read(inputs)
        if texts is None:
            return self.texts(inputs, truncate, prompt)
        ids = self.tokenizer.encode([prompt + t for t in texts], truncate=truncate, special=False)
        self._check_rows(ids)
        return ids

    def texts(self, inputs: Sequence[str | Sequence[int]], truncate: bool, prompt: str = "",
              from_start: bool = False, long_ok: bool = False) -> list[list[int] | None]:
        """A request's input: texts (each after ``prompt``) or token-id lists -> token ids. ``from_start``: an
        over-long input loses its start rather than its end. ``long_ok`` (texts, no truncation): an over-long
        text gives None instead of a 400."""
        texts = self._read(inputs)
        if texts:
            if prompt:
                texts = [prompt + t for t in texts]
            ids = self.tokenizer.encode(texts, truncate=truncate, from_start=from_start, long_ok=long_ok)
            self._check_rows(ids)
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

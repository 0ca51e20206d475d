"""The wire format: msgspec Structs, with the decoder and encoder built once.

``input`` arrives as JSON of four shapes (str, list[str], list[int], list[list[int]]) that msgspec cannot
tell apart in one union, so it is decoded loosely and checked by :func:`parse_input`. Unknown request
fields are ignored: OpenAI clients add fields over time and must keep working.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from embedserve.errors import InvalidRequest, clip, quoted

ENCODING_FORMATS = ("float", "base64", "int8", "uint8", "binary", "ubinary", "sparse", "multi_vector")


def _loose(description: str, *shapes: dict) -> Any:
    """A field decoded as ``Any`` (checked by hand, with errors that name it) whose documented JSON Schema is
    the shapes it accepts: the one place both the decoder and /openapi.json read."""
    return Annotated[Any, msgspec.Meta(description=description, extra_json_schema={"anyOf": list(shapes)})]


_STR = {"type": "string"}
_STRS = {"type": "array", "items": _STR, "minItems": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PAIR = {"type": "array", "items": _STR, "minItems": 2, "maxItems": 2}


_SPARSE_TOP_K = Annotated[int | None, msgspec.Meta(
    description="Sparse output (SPLADE, bge-m3's lexical weights): keep each vector's k largest weights.",
    extra_json_schema={"minimum": 1})]
# Fields of both embedding routes (OpenAI's and TEI's /embed).
_LATE_CHUNKING = Annotated[bool | None, msgspec.Meta(
    description="The inputs are consecutive chunks of one document (texts): it runs whole, in overlapping windows if "
                "longer than the model, and each chunk's vector is the mean of its own tokens' final states, so "
                "that it knows its context (late chunking). One vector per input, in order; usage counts the "
                "document's tokens.")]
_LATE_OVERLAP = Annotated[int | None, msgspec.Meta(
    description="Late chunking, a document longer than the model: tokens each window repeats from the one before; "
                "default: the server's --late-chunking-overlap.", extra_json_schema={"minimum": 0})]
_LONG_INPUT = Annotated[str | None, msgspec.Meta(
    description="An input longer than the model: truncate (cut), error (400), or mean (embedded as consecutive "
                "windows whose vectors are averaged, weighted by their tokens, then normalised); default: as "
                "truncate says, else the server's --long-input.",
    extra_json_schema={"enum": ["truncate", "error", "mean", None]})]


_PRIORITY = Annotated[int | None, msgspec.Meta(
    description="0-999, lower first: each forward pass is filled by priority, then arrival (the oldest input earns "
                "a share of each step, so nothing starves); default: the header X-Priority, else the server's "
                "--default-priority.",
    extra_json_schema={"minimum": 0, "maximum": 999})]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    input: _loose("What to embed: a text, texts, or token ids (one input or several).",
                  _STR, _STRS, _IDS, {"type": "array", "items": _IDS, "minItems": 1})
    model: Annotated[str, msgspec.Meta(description="The served model's name (GET /v1/models lists them).")]
    encoding_format: Annotated[str | None, msgspec.Meta(
        description="float (default); base64: standard base64 of the little-endian float32 bytes; int8 / uint8: one "
                    "integer per value, scaled to the value's range over the server's calibration texts "
                    "(-128..127 / 0..255); binary / ubinary: one bit per value (value > 0), most significant "
                    "bit first, 8 to an integer (-128..127 / 0..255): the width must be a multiple of 8; sparse "
                    "(a SPLADE model's only format, and bge-m3's lexical weights): {indices, values}, the nonzero "
                    "weights by token id; multi_vector (a ColBERT model's, or bge-m3's colbert vectors): a list of "
                    "vectors per input, one per token (bge-m3: after the first; ColBERT documents: but the "
                    "skiplist's).",
        extra_json_schema={"enum": [*ENCODING_FORMATS, None]})] = None
    dimensions: Annotated[int | None, msgspec.Meta(
        description="Keep the first k values, then L2-renormalise; 1 to the model's width.",
        extra_json_schema={"minimum": 1})] = None
    user: Annotated[str | None, msgspec.Meta(description="Accepted and ignored (OpenAI's end-user id).")] = None
    # embedserve's own extras
    truncate: Annotated[bool | None, msgspec.Meta(
        description="Cut inputs longer than the model's maximum (true) or refuse them with 400 (false); "
                    "default: the server's --truncate.")] = None
    normalize: Annotated[bool | None, msgspec.Meta(
        description="L2-normalise; default: as the model's sentence-transformers modules say.")] = None
    prompt_name: Annotated[str | None, msgspec.Meta(
        description="One of the model's prompts, prepended to each text.")] = None
    late_chunking: _LATE_CHUNKING = None
    late_chunking_overlap: _LATE_OVERLAP = None
    long_input: _LONG_INPUT = None
    sparse_top_k: _SPARSE_TOP_K = None
    is_query: Annotated[bool | None, msgspec.Meta(
        description="The inputs are queries (sentence-transformers' encode_query): the model's 'query' prompt when "
                    "prompt_name is not given, an inference-free sparse model's query side (no forward "
                    "pass), and a ColBERT model's query side (its query prefix, [MASK] expansion to its query "
                    "length).")] = None
    include_dense: Annotated[bool | None, msgspec.Meta(
        description="With encoding_format sparse or multi_vector, on a model with several outputs (bge-m3): the "
                    "dense vector too; each embedding is then one object ({dense, indices, values}, or "
                    "{multi_vector, dense, ...}), every output from one forward pass.")] = None
    multi_vector_format: Annotated[str | None, msgspec.Meta(
        description="With encoding_format multi_vector: float (default: a list of vectors) or base64: {shape: [n, "
                    "d], base64: the little-endian float32 bytes of the [n, d] matrix, row after row}.",
        extra_json_schema={"enum": ["float", "base64", None]})] = None
    include_sparse: Annotated[bool | None, msgspec.Meta(
        description="With encoding_format multi_vector (bge-m3): the lexical weights too, as indices and values in "
                    "the same object.")] = None
    priority: _PRIORITY = None


_MATRIX = {"type": "object", "properties": {"shape": {"type": "array", "items": {"type": "integer"}},
                                           "base64": {"type": "string", "contentEncoding": "base64"}},
           "required": ["shape", "base64"]}


class EmbeddingItem(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    index: int
    # list[float], or msgspec.Raw holding the base64 string already encoded (only ever encoded, never decoded)
    embedding: _loose("The vector: floats; with encoding_format base64 a string of its little-endian float32 "
                      "bytes; with int8, uint8, binary or ubinary a list of integers; with sparse {indices, values}; "
                      "with multi_vector a list of vectors, or {shape, base64}; with outputs included beside the "
                      "first, one object holding each (multi_vector, dense, indices and values).",
                      {"type": "array", "items": {"type": "number"}}, {"type": "string", "contentEncoding": "base64"},
                      {"type": "array", "items": {"type": "integer", "minimum": -128, "maximum": 255}},
                      {"type": "object", "properties": {"indices": {"type": "array", "items": {"type": "integer"}},
                                                        "values": {"type": "array", "items": {"type": "number"}},
                                                        "dense": {"type": "array", "items": {"type": "number"}},
                                                        "multi_vector": {}}},
                      {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                      _MATRIX)


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedserve"
    kind: str | None = None  # embedding, sparse, rerank or classify (null while loading)
    dimensions: int | None = None  # vector width, or the number of labels


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


class RerankRequest(msgspec.Struct, kw_only=True):
    """Cohere's and Jina's rerank body (``documents``), or TEI's (``texts``); the body tells which."""

    EITHER: ClassVar[tuple[str, ...]] = ("documents", "texts")  # exactly one of them (documented as oneOf)

    query: _loose("The query every document is scored against.", _STR)
    model: Annotated[str | None, msgspec.Meta(description="The served reranker's name.")] = None
    # Cohere / Jina
    documents: _loose("Cohere / Jina: the documents, as strings or {\"text\": ...} objects.", {
        "type": "array", "minItems": 1, "items": {"anyOf": [
            _STR, {"type": "object", "properties": {"text": _STR}, "required": ["text"]}]}}) = None
    top_n: Annotated[int | None, msgspec.Meta(description="Cohere / Jina: answer the best n only.",
                                              extra_json_schema={"minimum": 1})] = None
    return_documents: Annotated[bool, msgspec.Meta(
        description="Cohere / Jina: echo each document's text.")] = False
    max_tokens_per_doc: Annotated[int | None, msgspec.Meta(
        description="Cohere: cut each document after this many tokens first.", extra_json_schema={"minimum": 1})
    ] = None
    # TEI
    texts: _loose("TEI: the documents, as strings (answered in TEI's list shape).", _STRS) = None
    raw_scores: Annotated[bool, msgspec.Meta(description="TEI: logits instead of scores.")] = False
    return_text: Annotated[bool, msgspec.Meta(description="TEI: echo each text.")] = False
    truncate: Annotated[bool | None, msgspec.Meta(
        description="Cut over-long pairs (true) or refuse them (false); default: the server's --truncate.")] = None
    priority: _PRIORITY = None


class RerankDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(msgspec.Struct, kw_only=True):
    total_tokens: int
    prompt_tokens: int


class BilledUnits(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Cohere's: search units for a rerank, input tokens for an embed."""

    search_units: int | None = None
    input_tokens: int | None = None


class ApiVersion(msgspec.Struct, kw_only=True):
    version: str


class CohereMeta(msgspec.Struct, kw_only=True, omit_defaults=True):
    billed_units: BilledUnits
    api_version: ApiVersion | None = None


class RerankResponse(msgspec.Struct, kw_only=True):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage
    meta: CohereMeta


class TeiRank(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


class TeiEmbedRequest(msgspec.Struct, kw_only=True):
    """TEI's /embed (and huggingface_hub's feature_extraction, which posts the same body)."""

    inputs: _loose("A text or texts.", _STR, _STRS)
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Annotated[str | None, msgspec.Meta(
        description="Right (the default): an over-long input loses its end; Left: its start.",
        extra_json_schema={"enum": ["Right", "right", "Left", "left", None]})] = None
    prompt_name: str | None = None
    dimensions: Annotated[int | None, msgspec.Meta(extra_json_schema={"minimum": 1})] = None
    late_chunking: _LATE_CHUNKING = None
    late_chunking_overlap: _LATE_OVERLAP = None
    long_input: _LONG_INPUT = None
    priority: _PRIORITY = None


class TeiEmbedAllRequest(msgspec.Struct, kw_only=True):
    """TEI's /embed_all: every token's vector (here: a multi-vector model's)."""

    inputs: _loose("A text or texts.", _STR, _STRS)
    truncate: bool | None = None
    truncation_direction: Annotated[str | None, msgspec.Meta(
        description="Right (the default): an over-long input loses its end; Left: its start.",
        extra_json_schema={"enum": ["Right", "right", "Left", "left", None]})] = None
    prompt_name: str | None = None
    priority: _PRIORITY = None


class TeiSparseRequest(TeiEmbedAllRequest, kw_only=True):
    """TEI's /embed_sparse: /embed_all's fields and sparse_top_k."""

    sparse_top_k: _SPARSE_TOP_K = None


class TeiSparseValue(msgspec.Struct, kw_only=True):
    index: int
    value: float


class TeiTokenizeRequest(msgspec.Struct, kw_only=True):
    inputs: _loose("A text or texts.", _STR, _STRS)
    add_special_tokens: bool = True
    prompt_name: str | None = None


class TeiToken(msgspec.Struct, kw_only=True):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TeiDecodeRequest(msgspec.Struct, kw_only=True):
    ids: _loose("Token ids of one text, or of several.", _IDS, {"type": "array", "items": _IDS, "minItems": 1})
    skip_special_tokens: bool = True


class TeiPredictRequest(msgspec.Struct, kw_only=True):
    """TEI's /predict (embedserve's /classify): one text, one pair ``[a, b]``, or a batch of either."""

    inputs: _loose("A text, a pair [a, b], or a batch of either.", _STR, _PAIR,
                   {"type": "array", "minItems": 1, "items": {"anyOf": [_STR, _PAIR]}})
    raw_scores: bool = False
    truncate: bool | None = None
    top_k: Annotated[int | None, msgspec.Meta(description="Answer the k best labels only.")] = None
    priority: _PRIORITY = None


class TeiPrediction(msgspec.Struct, kw_only=True):
    score: float
    label: str


class TeiInfo(msgspec.Struct, kw_only=True):
    """TEI's /info, with embedserve's additions (kind, dimensions, device)."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_type: Annotated[dict[str, Any], msgspec.Meta(
        description='{"embedding": {"pooling"}}, {"reranker": {"id2label", "label2id"}} or {"classifier": ...}')]
    kind: str
    dimensions: int
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int
    max_client_batch_size: int
    tokenization_workers: int
    version: str
    device: str
    quantize: Annotated[str, msgspec.Meta(
        description='"none", or "int8" where the linear layers run int8 (--quantize; model_dtype is the rest\'s)')]


class Status(msgspec.Struct, kw_only=True):
    status: str


COHERE_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
COHERE_INPUT_TYPES = ("search_query", "search_document", "classification", "clustering")
COHERE_TRUNCATE = ("NONE", "START", "END")


class CohereEmbedRequest(msgspec.Struct, kw_only=True):
    """Cohere's embed body (``POST /v1/embed``, ``/v2/embed``): texts only."""

    texts: _loose("The texts to embed.", _STRS) = None
    model: Annotated[str | None, msgspec.Meta(description="The served model's name.")] = None
    input_type: Annotated[str | None, msgspec.Meta(
        description="Picks the model's prompt: search_query -> its prompt named search_query, else query; "
                    "search_document -> search_document, else document, else passage; classification and "
                    "clustering -> the prompt of that name; otherwise (or absent, or that prompt empty) none, "
                    "or the model's default prompt.",
        extra_json_schema={"enum": [*COHERE_INPUT_TYPES, None]})] = None
    embedding_types: Annotated[list[str] | None, msgspec.Meta(
        description="Any of float, int8, uint8, binary, ubinary (as on /v1/embeddings' encoding_format) and "
                    "base64 (little-endian float32). Default: float (v1: answered as embeddings_floats).",
        extra_json_schema={"items": {"enum": list(COHERE_TYPES)}, "minItems": 1})] = None
    output_dimension: Annotated[int | None, msgspec.Meta(
        description="Keep the first k values, then L2-renormalise.", extra_json_schema={"minimum": 1})] = None
    truncate: Annotated[str | None, msgspec.Meta(
        description="END (default): an over-long text keeps its start; START: keeps its end; NONE: refused "
                    "with 400.", extra_json_schema={"enum": [*COHERE_TRUNCATE, None]})] = None
    images: Annotated[Any, msgspec.Meta(description="Not supported here: a 400.")] = None
    inputs: Annotated[Any, msgspec.Meta(description="Not supported here (send texts): a 400.")] = None
    max_tokens: Annotated[Any, msgspec.Meta(description="Not supported here (see truncate): a 400.")] = None
    priority: _PRIORITY = None


class CohereEmbeddings(msgspec.Struct, kw_only=True, omit_defaults=True, rename={"float_": "float"}):
    """One list per type asked for, each with a row per text."""

    float_: list[list[float]] | None = None
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[Any] | None = None  # base64 strings, spliced in as made (msgspec.Raw)


class CohereEmbedByType(msgspec.Struct, kw_only=True):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class CohereEmbedFloats(msgspec.Struct, kw_only=True):
    """v1 without embedding_types."""

    id: str
    embeddings: list[list[float]]
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_floats"] = "embeddings_floats"


request_decoder = msgspec.json.Decoder(EmbeddingRequest)
cohere_embed_decoder = msgspec.json.Decoder(CohereEmbedRequest)
rerank_decoder = msgspec.json.Decoder(RerankRequest)
encoder = msgspec.json.Encoder()

_MISSING = re.compile(r"missing required field `(\w+)`")
_AT = re.compile(r"at `\$\.(\w+)")


_TEI_DECODERS: dict[type, msgspec.json.Decoder] = {}


def decode_tei(kind: type, body: bytes):
    """A TEI route's body as ``kind`` (one of the Tei*Request Structs); failures are 400s naming the field."""
    decoder = _TEI_DECODERS.get(kind)
    if decoder is None:
        decoder = _TEI_DECODERS[kind] = msgspec.json.Decoder(kind)
    return _decode(decoder, body, "`inputs`")


def check_count(field: str, count: int, max_items: int) -> None:
    """An array of more items than the server takes per request is a 400 that says both numbers."""
    if count > max_items:
        raise InvalidRequest(f"{field} has {count} items; this server accepts at most {max_items} per request",
                             param=field)


def check_dimensions(dimensions: int | None) -> None:
    """``dimensions`` is a positive integer when given (the model's width is checked by the engine)."""
    if dimensions is not None and dimensions < 1:
        raise InvalidRequest(f"dimensions must be a positive integer, got {dimensions}", param="dimensions")


def tei_texts(value: Any, *, field: str, max_items: int) -> list[str]:
    """TEI's ``inputs``: a string or a non-empty array of strings."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise InvalidRequest(f"{field} must be a string or a non-empty array of strings", param=field)
    check_count(field, len(items), max_items)
    return items


def tei_predict_inputs(value: Any, *, max_items: int) -> tuple[list[tuple[str, str | None]], bool]:
    """TEI's predict ``inputs`` -> (texts or pairs, whether it was a batch). As TEI reads it: a string is one
    text; an array of two strings is one pair; otherwise an array of texts or of two-string pairs."""
    def one(x, i=None):
        if isinstance(x, str):
            return (x, None)
        if isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x):
            return (x[0], x[1])
        where = "inputs" if i is None else f"inputs[{i}]"
        raise InvalidRequest(f"{where} must be a string or a pair of two strings", param="inputs")

    if isinstance(value, str) or (isinstance(value, list) and len(value) == 2 and all(isinstance(t, str) for t in value)):
        return [one(value)], False
    if not isinstance(value, list) or not value:
        raise InvalidRequest("inputs must be a string, a pair of strings, or a non-empty array of either",
                             param="inputs")
    check_count("inputs", len(value), max_items)
    return [one(x, i) for i, x in enumerate(value)], True


MAX_NESTING = 16  # arrays and objects inside each other; the deepest body any route takes nests 4
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NESTING_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_NOT_BRACKETS = bytes(b for b in range(256) if b not in _NESTING_STEP)


def check_nesting(body: bytes) -> None:
    """Refuse a body whose arrays and objects nest deeper than :data:`MAX_NESTING` (a 400, before the decoder
    recurses into it). Linear in the body, at C speed unless it holds many brackets."""
    if body.count(b"[") + body.count(b"{") <= MAX_NESTING:
        return
    brackets = _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    for b in brackets:
        depth += _NESTING_STEP[b]
        if depth > MAX_NESTING:
            raise InvalidRequest(f"The request body nests arrays and objects more than {MAX_NESTING} levels deep; "
                                 "no request needs more than 4.")


def _decode(decoder: msgspec.json.Decoder, body: bytes, needs: str):
    if not body.strip():
        raise InvalidRequest(f"The request body is empty; send a JSON object with {needs}.")
    check_nesting(body)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        text = str(e)
        m = _MISSING.search(text) or _AT.search(text)
        raise InvalidRequest(f"Invalid request: {clip(text)}", param=m.group(1) if m else None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {clip(str(e))}") from None
    except RecursionError:  # not reached past check_nesting; never a 500 if it were
        raise InvalidRequest(f"The request body nests more than {MAX_NESTING} levels deep.") from None


def decode_request(body: bytes) -> EmbeddingRequest:
    """Parse and type-check a request body; every failure is a 400 naming the offending field."""
    req = _decode(request_decoder, body, "`input` and `model`")
    if req.encoding_format is not None and req.encoding_format not in ENCODING_FORMATS:
        raise InvalidRequest(
            f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, got {quoted(req.encoding_format)}",
            param="encoding_format",
        )
    check_dimensions(req.dimensions)
    check_late(req.late_chunking_overlap)
    return req


def check_late(overlap: int | None) -> None:
    if overlap is not None and overlap < 0:
        raise InvalidRequest(f"late_chunking_overlap must be 0 or more, got {overlap}", param="late_chunking_overlap")


def _is_int(x: object) -> bool:
    return type(x) is int  # JSON true/false decode to bool, a subclass of int: not token ids


def parse_input(value: Any, *, max_items: int) -> list[str] | list[list[int]]:
    """Normalise ``input`` to a list of texts or a list of token-id lists.

    Only the shape is checked here, on the event loop (O(items)); every id is checked by the engine on its
    tokenisation pool."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InvalidRequest(
            "input must be a string, an array of strings, an array of token ids or an array of token-id arrays",
            param="input",
        )
    if not value:
        raise InvalidRequest("input must not be an empty array", param="input")
    first = value[0]
    if _is_int(first):
        return [value]  # one input of token ids: checked against the model's length like a text, not counted
    check_count("input", len(value), max_items)
    if isinstance(first, str):
        if not all(isinstance(x, str) for x in value):
            raise InvalidRequest("input mixes strings with other types", param="input")
        return value
    if isinstance(first, list):
        for i, ids in enumerate(value):
            if not isinstance(ids, list):
                raise InvalidRequest(f"input[{i}] must be an array of integer token ids", param="input")
        return value
    raise InvalidRequest(
        "input must be a string, an array of strings, an array of token ids or an array of token-id arrays",
        param="input",
    )


def decode_rerank(body: bytes, *, max_items: int) -> tuple[RerankRequest, str, list[str]]:
    """A rerank body -> (request, ``"tei"`` or ``"cohere"``, the document texts). Documents are strings or
    ``{"text": ...}`` objects (Cohere, Jina); TEI sends ``texts``."""
    req = _decode(rerank_decoder, body, "`query` and `documents`")
    if not isinstance(req.query, str):
        raise InvalidRequest("query must be a string", param="query")
    tei = req.texts is not None
    if tei and req.documents is not None:
        raise InvalidRequest("send either documents (Cohere / Jina) or texts (TEI), not both", param="documents")
    field = "texts" if tei else "documents"
    docs = req.texts if tei else req.documents
    if not isinstance(docs, list) or not docs:
        raise InvalidRequest(f"{field} must be a non-empty array", param=field)
    check_count(field, len(docs), max_items)
    texts = []
    for i, d in enumerate(docs):
        if isinstance(d, dict) and not tei and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str):
            raise InvalidRequest(f"{field}[{i}] must be a string{'' if tei else ' or an object with a text string'}",
                                 param=field)
        texts.append(d)
    if req.top_n is not None and req.top_n < 1:
        raise InvalidRequest(f"top_n must be a positive integer, got {req.top_n}", param="top_n")
    if req.max_tokens_per_doc is not None and req.max_tokens_per_doc < 1:
        raise InvalidRequest(f"max_tokens_per_doc must be a positive integer, got {req.max_tokens_per_doc}",
                             param="max_tokens_per_doc")
    return req, "tei" if tei else "cohere", texts


def decode_cohere_embed(body: bytes, *, max_items: int) -> CohereEmbedRequest:
    """A Cohere embed body, checked field by field (each failure a 400 naming its field)."""
    req = _decode(cohere_embed_decoder, body, "`texts` and `input_type`")
    for field in ("images", "inputs", "max_tokens"):
        if getattr(req, field) is not None:
            raise InvalidRequest(f"{field} is not supported by this server; send texts"
                                 f"{' and truncate' if field == 'max_tokens' else ''}", param=field)
    if not isinstance(req.texts, list) or not req.texts or not all(isinstance(t, str) for t in req.texts):
        raise InvalidRequest("texts must be a non-empty array of strings", param="texts")
    check_count("texts", len(req.texts), max_items)
    if req.input_type is not None and req.input_type not in COHERE_INPUT_TYPES:
        raise InvalidRequest(f"input_type must be one of {', '.join(COHERE_INPUT_TYPES)}, got "
                             f"{quoted(req.input_type)}", param="input_type")
    if req.embedding_types is not None:
        if not req.embedding_types:
            raise InvalidRequest("embedding_types must name at least one type", param="embedding_types")
        for t in req.embedding_types:
            if t not in COHERE_TYPES:
                raise InvalidRequest(f"embedding_types may hold {', '.join(COHERE_TYPES)}, got {quoted(t)}",
                                     param="embedding_types")
    if req.truncate is not None and req.truncate not in COHERE_TRUNCATE:
        raise InvalidRequest(f"truncate must be one of {', '.join(COHERE_TRUNCATE)}, got {quoted(req.truncate)}",
                             param="truncate")
    if req.output_dimension is not None and req.output_dimension < 1:
        raise InvalidRequest(f"output_dimension must be a positive integer, got {req.output_dimension}",
                             param="output_dimension")
    return req

"""Cohere's embed API (``POST /v2/embed`` and ``/v1/embed``), so that the ``cohere`` SDK and the frameworks that
wrap it (LangChain's ``CohereEmbeddings``) work with ``base_url`` pointed here.

The request's ``input_type`` picks one of the model's prompts, ``embedding_types`` the output types (every one
from the same forward pass), ``truncate`` which end of an over-long text is cut. Answers are Cohere's shapes;
errors keep this server's (OpenAI's) body, as on every route here.
"""

from __future__ import annotations

import uuid

import msgspec
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from embedserve.engine.interface import INTEGER_ENCODINGS, EmbedOptions
from embedserve.errors import InvalidRequest, WrongModelKind
from embedserve.http.routes import (
    ENCODE_INLINE_FLOATS,
    check_auth,
    integer_rows,
    priority_of,
    read_body,
    record_result,
    service,
    until_disconnect,
)
from embedserve.protocol import (
    ApiVersion,
    BilledUnits,
    CohereEmbedByType,
    CohereEmbeddings,
    CohereEmbedFloats,
    CohereMeta,
    decode_cohere_embed,
    encoder,
)

# input_type -> the prompt names tried in turn; the first the model has (and is not empty) is used.
PROMPTS_FOR = {
    "search_query": ("search_query", "query"),
    "search_document": ("search_document", "document", "passage"),
    "classification": ("classification",),
    "clustering": ("clustering",),
}


def prompt_for(input_type: str | None, prompts: tuple[str, ...]) -> str | None:
    """The prompt name ``input_type`` picks among ``prompts`` (the model's non-empty ones); None: the model's
    default prompt, if it has one."""
    return next((name for name in PROMPTS_FOR.get(input_type or "", ()) if name in prompts), None)


def _answer(version: str, result, texts: list[str], types: list[str] | None) -> bytes:
    meta = CohereMeta(api_version=ApiVersion(version=version),
                      billed_units=BilledUnits(input_tokens=result.total_tokens))
    rid = str(uuid.uuid4())
    if types is None:  # v1 without embedding_types
        return encoder.encode(CohereEmbedFloats(id=rid, embeddings=result.vectors.tolist(), texts=texts, meta=meta))
    by_type = {}
    for t in types:
        if t == "float":
            by_type["float_"] = result.vectors.tolist()
        elif t == "base64":
            by_type["base64"] = [msgspec.Raw(b'"' + text + b'"') for text in result.encoded["base64"]]
        elif t in INTEGER_ENCODINGS:
            by_type[t] = integer_rows(result.encoded[t], t)
    return encoder.encode(CohereEmbedByType(id=rid, embeddings=CohereEmbeddings(**by_type), texts=texts, meta=meta))


async def embed(request: Request) -> Response:
    svc = service(request)
    check_auth(request, svc)
    svc.require_ready()
    version = "2" if request.url.path.startswith("/v2/") else "1"
    req = decode_cohere_embed(await read_body(request, svc.config.max_body_bytes),
                              max_items=svc.config.max_inputs_per_request)
    name, engine = svc.pick(req.model)
    info = engine.info
    if info.kind != "embedding":
        raise WrongModelKind("embed", info.kind, "embedding")
    width = req.output_dimension or info.dimensions
    if width > info.dimensions:
        raise InvalidRequest(f"output_dimension must be between 1 and {info.dimensions} for this model, got {width}",
                             param="output_dimension")
    types = list(dict.fromkeys(req.embedding_types)) if req.embedding_types else None
    if types is None and version == "2":
        types = ["float"]
    if width % 8 and {"binary", "ubinary"} & set(types or ()):
        raise InvalidRequest(f"binary and ubinary embeddings pack 8 values per byte: the width must be a multiple "
                             f"of 8, and this request's is {width}", param="output_dimension")
    options = EmbedOptions(
        dimensions=req.output_dimension, truncate=req.truncate != "NONE", truncate_start=req.truncate == "START",
        prompt_name=prompt_for(req.input_type, info.prompts),
        encodings=tuple(t for t in types or () if t != "float"), priority=priority_of(request, req.priority),
    )
    request.scope["state"]["access"]["inputs"] = len(req.texts)
    result = await until_disconnect(request, engine.embed(req.texts, options))
    headers = record_result(svc, request, len(req.texts), result, engine)
    args = (version, result, req.texts, types)
    if result.vectors.numel() > ENCODE_INLINE_FLOATS:
        body = await run_in_threadpool(_answer, *args)  # a big answer: keep the event loop free
    else:
        body = _answer(*args)
    return Response(body, media_type="application/json", headers=headers)

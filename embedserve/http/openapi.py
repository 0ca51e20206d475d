"""The HTTP API as one table: the app's routes are built from it, and ``GET /openapi.json`` describes it.

Every route is an :class:`Operation`; request and answer bodies are the msgspec Structs of
:mod:`embedserve.protocol` (msgspec writes their JSON Schema), errors are OpenAI's body (``ErrorBody``) under
the status codes each route can answer. The document is built per request from the running server: the
security requirement appears when API keys are configured, and a route that none of the served models can
answer (rerank on a server of embedders) says so. ``GET /docs`` is Swagger UI from the swagger-ui-py
package's bundled files, served from here: no CDN, and relative links, so it works offline and under an
ingress path prefix.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

import embedserve
from embedserve.http import cohere, routes, tei
from embedserve.protocol import (
    CohereEmbedByType,
    CohereEmbedFloats,
    CohereEmbedRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorBody,
    ModelList,
    RerankRequest,
    RerankResponse,
    Status,
    TeiDecodeRequest,
    TeiEmbedAllRequest,
    TeiEmbedRequest,
    TeiInfo,
    TeiPrediction,
    TeiPredictRequest,
    TeiSparseRequest,
    TeiSparseValue,
    TeiRank,
    TeiToken,
    TeiTokenizeRequest,
    encoder,
)

ALL_KINDS = ("embedding", "sparse", "multi_vector", "rerank", "classify")

# What each status means on this server (the error body is always OpenAI's).
_ERRORS = {
    400: "Invalid request: a field is missing, has the wrong type or value, an input is too long (with truncation "
         "off), or the model's kind cannot answer this route (code wrong_model_kind).",
    401: "Missing or wrong API key (only when the server has --api-key).",
    404: "The request names a model this server does not serve (code model_not_found; the message lists them).",
    413: "The request body is larger than --max-body-bytes.",
    429: "The queue is full (--max-queue); retry after the Retry-After header's seconds.",
    500: "The forward pass failed (code engine_error); the server goes on.",
    503: "Not ready yet (loading or warming up), shutting down, or the model's engine has failed.",
}
_ENGINE = (400, 401, 404, 413, 429, 500, 503)  # routes that put work on a model
_TEI = (400, 401, 413, 429, 500, 503)  # TEI's: the default model, no model name


@dataclass(frozen=True)
class Operation:
    path: str
    method: str
    endpoint: Callable
    summary: str
    tag: str
    request: Any = None  # the body's Struct
    response: Any = None  # the 200 body's type (JSON), or a tuple of the types it may be; None: ``media`` says
    media: str = "application/json"
    errors: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ALL_KINDS  # the model kinds that can answer it
    auth: bool = True
    routed: bool = False  # the body names the model; otherwise the default (first) model answers
    description: str = ""
    example: dict | None = None


_EMBED_EXAMPLE = {"model": "all-MiniLM-L6-v2", "input": ["The food was delicious.", "A quick brown fox."]}
_COHERE_EXAMPLE = {"model": "all-MiniLM-L6-v2", "texts": ["The food was delicious."],
                   "input_type": "search_document", "embedding_types": ["float", "int8", "ubinary"]}
_RERANK_EXAMPLE = {"model": "reranker", "query": "What is the capital of France?",
                   "documents": ["Paris is the capital of France.", "Berlin is in Germany."], "top_n": 2}
_TEI_RERANK_EXAMPLE = {"query": "What is the capital of France?",
                       "texts": ["Paris is the capital of France.", "Berlin is in Germany."]}

# msgspec takes one array type per union: answers that are one of several arrays are tuples of types.
_PREDICTIONS = (list[TeiPrediction], list[list[TeiPrediction]])
# Every rerank route tells the shapes apart by the body: documents -> Cohere's answer, texts -> TEI's list.
_RANKED = (RerankResponse, list[TeiRank])

OPERATIONS: tuple[Operation, ...] = (
    Operation("/v1/embeddings", "POST", routes.embeddings, "Create embeddings (OpenAI)", "embeddings",
              EmbeddingRequest, EmbeddingResponse, errors=_ENGINE, routed=True, kinds=("embedding", "sparse", "multi_vector"),
              example=_EMBED_EXAMPLE,
              description="OpenAI's embeddings API: the same vectors sentence-transformers gives for the model."),
    Operation("/embeddings", "POST", routes.embeddings, "Create embeddings (OpenAI, without /v1)", "embeddings",
              EmbeddingRequest, EmbeddingResponse, errors=_ENGINE, routed=True, kinds=("embedding", "sparse", "multi_vector"),
              example=_EMBED_EXAMPLE),
    Operation("/v2/embed", "POST", cohere.embed, "Embed (Cohere v2)", "embeddings", CohereEmbedRequest,
              CohereEmbedByType, errors=_ENGINE, routed=True, kinds=("embedding",), example=_COHERE_EXAMPLE,
              description="Cohere's embed API: several output types from one forward pass, input_type picking "
                          "the model's prompt, truncate NONE / START / END."),
    Operation("/v1/embed", "POST", cohere.embed, "Embed (Cohere v1)", "embeddings", CohereEmbedRequest,
              (CohereEmbedFloats, CohereEmbedByType), errors=_ENGINE, routed=True, kinds=("embedding",),
              example=_COHERE_EXAMPLE, description="As /v2/embed; without embedding_types the answer is v1's "
                                                   "embeddings_floats."),
    Operation("/v1/rerank", "POST", routes.rerank, "Rerank documents (Cohere / Jina)", "rerank",
              RerankRequest, _RANKED, errors=_ENGINE, routed=True, kinds=("rerank", "colbert"),
              example=_RERANK_EXAMPLE,
              description="Scores each document against the query with a cross-encoder, or by MaxSim with a "
                          "ColBERT model; results best first."),
    Operation("/v2/rerank", "POST", routes.rerank, "Rerank documents (Cohere v2)", "rerank",
              RerankRequest, _RANKED, errors=_ENGINE, routed=True, kinds=("rerank", "colbert"),
              example=_RERANK_EXAMPLE),
    Operation("/rerank", "POST", routes.rerank, "Rerank documents (Cohere / Jina, or TEI with texts)", "rerank",
              RerankRequest, _RANKED, errors=_ENGINE, routed=True, kinds=("rerank", "colbert"),
              example=_TEI_RERANK_EXAMPLE,
              description="A body with documents is answered in Cohere's shape; one with texts in TEI's list."),
    Operation("/embed", "POST", tei.embed, "Embed (TEI)", "tei", TeiEmbedRequest, list[list[float]],
              errors=_TEI, kinds=("embedding",), example={"inputs": ["The food was delicious."]},
              description="Text-embeddings-inference's embed route, answered by the default (first) model."),
    Operation("/embed_sparse", "POST", tei.embed_sparse, "Sparse embeddings (TEI)", "tei", TeiSparseRequest,
              list[list[TeiSparseValue]], errors=_TEI, kinds=("sparse",), example={"inputs": ["The food was good."]},
              description="A SPLADE model's vectors: per input its nonzero weights by token id, in TEI's shape."),
    Operation("/embed_all", "POST", tei.embed_all, "Token vectors (TEI)", "tei", TeiEmbedAllRequest,
              list[list[list[float]]], errors=_TEI, kinds=("multi_vector",),
              example={"inputs": ["The food was good."]},
              description="A multi-vector model's per-token vectors (a ColBERT model's documents, bge-m3's colbert "
                          "vectors), in TEI's shape: per "
                          "input, a list of vectors."),
    Operation("/predict", "POST", tei.predict, "Classify or score pairs (TEI)", "tei", TeiPredictRequest,
              _PREDICTIONS, errors=_TEI, kinds=("rerank", "classify"),
              example={"inputs": ["What is the capital of France?", "Paris is the capital of France."]}),
    Operation("/classify", "POST", tei.predict, "Classify or score pairs (TEI's predict)", "tei", TeiPredictRequest,
              _PREDICTIONS, errors=_TEI, kinds=("rerank", "classify"), example={"inputs": "I loved it"}),
    Operation("/tokenize", "POST", tei.tokenize, "Tokenize (TEI)", "tei", TeiTokenizeRequest, list[list[TeiToken]],
              errors=(400, 401, 413, 503), example={"inputs": "The food was delicious."}),
    Operation("/decode", "POST", tei.decode, "Token ids back to text (TEI)", "tei", TeiDecodeRequest, list[str],
              errors=(400, 401, 413, 503), example={"ids": [101, 7592, 102]}),
    Operation("/info", "GET", tei.info, "Model information (TEI)", "tei", response=TeiInfo, errors=(401, 503)),
    Operation("/", "POST", tei.root, "Embed or classify (TEI's root route)", "tei", TeiEmbedRequest,
              (list[list[float]], *_PREDICTIONS), errors=_TEI, example={"inputs": "The food was delicious."},
              description="Where huggingface_hub's InferenceClient posts: embed for an embedding model, predict "
                          "for a classifier or reranker (then the body is TEI's predict body)."),
    Operation("/v1/models", "GET", routes.models, "List the served models", "models", response=ModelList,
              errors=(401,)),
    Operation("/models", "GET", routes.models, "List the served models (without /v1)", "models",
              response=ModelList, errors=(401,)),
    Operation("/health", "GET", routes.health, "Liveness", "operations", response=Status, errors=(503,),
              auth=False, description="200 while the process serves; 503 once its engine has failed for good."),
    Operation("/ready", "GET", routes.ready, "Readiness", "operations", response=Status, errors=(503,), auth=False,
              description="200 once every model is loaded and warmed up; 503 while loading and when draining."),
    Operation("/metrics", "GET", routes.metrics, "Prometheus metrics", "operations", media="text/plain",
              auth=False),
)


async def openapi_json(request: Request) -> Response:
    return Response(encoder.encode(build_spec(request.app.state.service)), media_type="application/json")


async def docs(request: Request) -> Response:
    """Swagger UI, from the package's files under /docs/assets; every link relative to this page."""
    return HTMLResponse(_DOCS_PAGE)


async def landing(request: Request) -> Response:
    svc = request.app.state.service
    names = ", ".join(html.escape(n) for n in (svc.serving() or [svc.served_name]))
    return HTMLResponse(_LANDING.format(version=embedserve.__version__, models=names))


OPERATIONS += (
    Operation("/", "GET", landing, "This page's links: the docs, the OpenAPI document, the models", "operations",
              media="text/html", auth=False),
    Operation("/openapi.json", "GET", openapi_json, "This OpenAPI document", "operations", auth=False,
              media="application/json"),
    Operation("/docs", "GET", docs, "Interactive documentation (Swagger UI)", "operations", media="text/html",
              auth=False),
)


def swagger_ui_assets() -> Path:
    """The Swagger UI files swagger-ui-py ships (served at /docs/assets)."""
    import swagger_ui

    return Path(swagger_ui.__file__).parent / "static"


def _served_kinds(svc, routed: bool) -> set[str] | None:
    """The kinds of model that may answer: any served one's where the body names it, else the default's."""
    if svc.engine is None:
        return None  # still loading
    kinds = set()
    for e in svc.serving().values() if routed else [svc.engine]:
        kinds.add(e.info.kind)
        if e.info.lexical:  # an embedding model that also answers sparse requests (bge-m3)
            kinds.add("sparse")
        if e.info.multi_vector:
            kinds.add("multi_vector")
        if e.info.kind == "multi_vector":  # a ColBERT model: the rerank routes score by MaxSim
            kinds.add("colbert")
    return kinds


def build_spec(svc) -> dict:
    """The OpenAPI 3.1 document of :data:`OPERATIONS` for this server."""
    types = {id(t): t for op in OPERATIONS for t in (op.request, *_alternatives(op.response)) if t is not None}
    types[id(ErrorBody)] = ErrorBody
    ordered = list(types.values())
    schemas, components = msgspec.json.schema_components(ordered, ref_template="#/components/schemas/{name}")
    schema_of = {id(t): s for t, s in zip(ordered, schemas)}
    error = schema_of[id(ErrorBody)]
    for t in ordered:
        either = getattr(t, "EITHER", None)  # a body that takes exactly one of these fields
        if either:
            components[t.__name__]["oneOf"] = [{"required": [f]} for f in either]
    for component in components.values():
        for prop in component.get("properties", {}).values():
            # A loosely decoded field defaults to None for "not given", which its documented shapes exclude.
            if "default" in prop and prop["default"] is None and {"type": "null"} not in prop.get("anyOf", []):
                del prop["default"]

    def answer_schema(response) -> dict:
        alternatives = [schema_of[id(t)] for t in _alternatives(response)]
        return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}

    _name_the_models(svc, components)
    secured = bool(svc.config.api_keys)
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        entry: dict[str, Any] = {
            "summary": op.summary,
            "operationId": _operation_id(op),
            "tags": [op.tag],
        }
        description = op.description
        kinds = _served_kinds(svc, op.routed)
        if op.kinds != ALL_KINDS:
            description += f" Answered by {' or '.join(op.kinds)} models."
            if kinds is not None and not kinds & set(op.kinds):
                whose = "this server's models are" if op.routed else "the default model, which answers it, is"
                description += (f" Here {whose} {' and '.join(sorted(kinds))}: it answers 400 wrong_model_kind.")
                entry["x-embedserve-available"] = False
        if description.strip():
            entry["description"] = description.strip()
        if op.request is not None:
            body: dict[str, Any] = {"schema": schema_of[id(op.request)]}
            if op.example is not None:
                body["example"] = op.example
            entry["requestBody"] = {"required": True, "content": {"application/json": body}}
        ok: dict[str, Any] = {"description": "OK"}
        if op.response is not None:
            ok["content"] = {op.media: {"schema": answer_schema(op.response)}}
        else:
            ok["content"] = {op.media: {"schema": {"type": "object" if op.media == "application/json" else "string"}}}
        responses: dict[str, Any] = {"200": ok}
        for code in op.errors:
            if code == 401 and not (op.auth and secured):
                continue
            answer: dict[str, Any] = {"description": _ERRORS[code], "content": {"application/json": {"schema": error}}}
            if code == 429:
                answer["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
            responses[str(code)] = answer
        entry["responses"] = responses
        entry["security"] = [{"bearer": []}] if op.auth and secured else []
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "embedserve",
            "version": embedserve.__version__,
            "description": "OpenAI-compatible embeddings, Cohere / Jina rerank and text-embeddings-inference's "
                           "routes from one packed engine. Errors always have OpenAI's body: "
                           '{"error": {"message", "type", "param", "code"}}.',
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An API key from --api-key, as 'Authorization: Bearer <key>'. "
                               + ("This server requires one." if secured else "This server has none configured: "
                                  "any or no key is accepted."),
            }},
        },
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS)],
    }


# Request bodies that name a model, and the kinds of model that can answer them.
_NAMED = {"EmbeddingRequest": ("embedding", "sparse"), "RerankRequest": ("rerank",)}


def _name_the_models(svc, components: dict) -> None:
    """Where a request's ``model`` must name a served model (several models, or --reject-unknown-model), the
    schema lists the names of the models that can answer that body, and the name becomes required: with none,
    the default model answers, and it may be of another kind."""
    engines = svc.engines
    if not engines or (len(engines) == 1 and not svc.config.reject_unknown_model):
        return
    for component, kinds in _NAMED.items():
        names = [name for name, e in engines.items() if e.info.kind in kinds]
        schema = components.get(component)
        if not names or schema is None:
            continue
        schema["properties"]["model"] = {**schema["properties"]["model"], "enum": names}
        schema["properties"]["model"].pop("anyOf", None)
        schema["properties"]["model"].pop("default", None)
        schema["properties"]["model"]["type"] = "string"
        schema["required"] = sorted({*schema.get("required", ()), "model"})


def _alternatives(response) -> tuple:
    return response if isinstance(response, tuple) else (response,)


def _operation_id(op: Operation) -> str:
    words = [w for w in op.path.replace("/", " ").replace(".", " ").split() if w] or ["root"]
    return op.method.lower() + "_" + "_".join(words)


_DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>embedserve API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true,
                             presets: [SwaggerUIBundle.presets.apis]});
</script>
</body>
</html>
"""

_LANDING = """<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>embedserve</title></head>
<body>
<h1>embedserve {version}</h1>
<p>Serving: {models}</p>
<ul>
<li><a href="docs">API documentation (docs)</a></li>
<li><a href="openapi.json">OpenAPI document (openapi.json)</a></li>
<li><a href="v1/models">Models (v1/models)</a></li>
<li><a href="metrics">Metrics (metrics)</a></li>
</ul>
</body>
</html>
"""

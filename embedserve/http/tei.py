"""Hugging Face text-embeddings-inference's native routes, so that TEI's clients keep working.

``POST /embed`` (and ``POST /``, where huggingface_hub's ``InferenceClient.feature_extraction`` posts), ``POST
/predict`` and ``/classify``, ``POST /tokenize``, ``POST /decode`` and ``GET /info``, in TEI's request and answer
shapes, over the same engine as the OpenAI routes. Errors keep OpenAI's body, as on every route here. TEI's
``/rerank`` shares the Cohere route (routes.rerank), which tells the shapes apart by the body.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

import embedserve
from embedserve.engine.interface import EmbedOptions
from embedserve.errors import ContextLengthExceeded, InvalidRequest, WrongModelKind
from embedserve.http.routes import (
    ENCODE_INLINE_FLOATS,
    check_auth,
    priority_of,
    read_body,
    record_result,
    service,
    until_disconnect,
)
from embedserve.protocol import (
    TeiDecodeRequest,
    TeiEmbedAllRequest,
    TeiEmbedRequest,
    TeiInfo,
    TeiPrediction,
    TeiPredictRequest,
    TeiSparseRequest,
    TeiSparseValue,
    TeiToken,
    TeiTokenizeRequest,
    check_count,
    check_dimensions,
    check_late,
    decode_tei,
    encoder,
    tei_predict_inputs,
    tei_texts,
)


def _default_model(request: Request):
    """(service, engine) for a TEI route: authorised, ready, and the default model (TEI's bodies name none)."""
    svc = service(request)
    check_auth(request, svc)
    svc.require_ready()
    return svc, svc.pick(None)[1]


def _from_the_left(direction: str | None) -> bool:
    """TEI's truncation_direction: Right (None too) cuts an over-long input's end, Left its start."""
    if direction not in (None, "right", "Right", "left", "Left"):
        raise InvalidRequest("truncation_direction must be Right (an over-long input loses its end) or Left (its "
                             "start)", param="truncation_direction")
    return direction in ("left", "Left")


def _json(body, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


async def embed(request: Request) -> Response:
    svc, engine = _default_model(request)
    req = decode_tei(TeiEmbedRequest, await read_body(request, svc.config.max_body_bytes))
    if engine.info.kind != "embedding":
        raise WrongModelKind("embed", engine.info.kind, "embedding")
    texts = tei_texts(req.inputs, field="inputs", max_items=svc.config.max_inputs_per_request)
    truncate_start = _from_the_left(req.truncation_direction)
    check_dimensions(req.dimensions)
    check_late(req.late_chunking_overlap)
    options = EmbedOptions(dimensions=req.dimensions, normalize=req.normalize, truncate=req.truncate,
                           truncate_start=truncate_start, prompt_name=req.prompt_name,
                           late_chunking=bool(req.late_chunking), late_chunking_overlap=req.late_chunking_overlap,
                           long_input=req.long_input, priority=priority_of(request, req.priority))
    result = await until_disconnect(request, engine.embed(texts, options))
    headers = record_result(svc, request, len(texts), result, engine)
    if result.vectors.numel() > ENCODE_INLINE_FLOATS:
        return Response(await run_in_threadpool(encoder.encode, result.vectors.tolist()),
                        media_type="application/json", headers=headers)
    return _json(result.vectors.tolist(), headers)


async def embed_sparse(request: Request) -> Response:
    """A SPLADE model's sparse vectors, TEI's shape: per input, its nonzero weights ``{"index", "value"}`` by
    token id."""
    svc, engine = _default_model(request)
    req = decode_tei(TeiSparseRequest, await read_body(request, svc.config.max_body_bytes))
    texts = tei_texts(req.inputs, field="inputs", max_items=svc.config.max_inputs_per_request)
    options = EmbedOptions(sparse=True, top_k=req.sparse_top_k, truncate=req.truncate,
                           truncate_start=_from_the_left(req.truncation_direction), prompt_name=req.prompt_name,
                           priority=priority_of(request, req.priority))
    result = await until_disconnect(request, engine.embed(texts, options))
    headers = record_result(svc, request, len(texts), result, engine)
    body = [[TeiSparseValue(index=i, value=v) for i, v in zip(ids.tolist(), weights.tolist())]
            for ids, weights in result.sparse]
    return _json(body, headers)


async def embed_all(request: Request) -> Response:
    """A multi-vector model's per-token vectors (a ColBERT model's documents, bge-m3's colbert vectors), TEI's shape:
    per input, its vectors."""
    svc, engine = _default_model(request)
    req = decode_tei(TeiEmbedAllRequest, await read_body(request, svc.config.max_body_bytes))
    texts = tei_texts(req.inputs, field="inputs", max_items=svc.config.max_inputs_per_request)
    options = EmbedOptions(multi_vector=True, truncate=req.truncate, prompt_name=req.prompt_name,
                           truncate_start=_from_the_left(req.truncation_direction),
                           priority=priority_of(request, req.priority))
    result = await until_disconnect(request, engine.embed(texts, options))
    headers = record_result(svc, request, len(texts), result, engine)

    def body() -> bytes:
        return encoder.encode([m.tolist() for m in result.multi])

    big = sum(m.numel() for m in result.multi) > ENCODE_INLINE_FLOATS  # then off the event loop
    return Response(await run_in_threadpool(body) if big else body(), media_type="application/json",
                    headers=headers)


async def predict(request: Request) -> Response:
    """Labels and scores of a sequence classifier (or a cross-encoder's one label) for texts or pairs: TEI's
    scores (sigmoid for one label, softmax for several) unless ``raw_scores``."""
    svc, engine = _default_model(request)
    req = decode_tei(TeiPredictRequest, await read_body(request, svc.config.max_body_bytes))
    if engine.info.labels is None:
        raise WrongModelKind("classify", engine.info.kind, "classify")
    inputs, batch = tei_predict_inputs(req.inputs, max_items=svc.config.max_inputs_per_request)
    if req.top_k is not None and req.top_k < 1:
        raise InvalidRequest(f"top_k must be a positive integer, got {req.top_k}", param="top_k")
    work = engine.score(inputs, truncate=req.truncate, route="classify", priority=priority_of(request, req.priority))
    result = await until_disconnect(request, work)
    headers = record_result(svc, request, len(inputs), result, engine)
    labels = engine.info.labels
    scores = result.vectors
    if not req.raw_scores:
        scores = engine.scores(scores, activation="sigmoid" if len(labels) == 1 else "softmax")
    answers = []
    for row in scores.tolist():
        ranked = sorted((TeiPrediction(score=s, label=labels[j]) for j, s in enumerate(row)), key=lambda p: -p.score)
        answers.append(ranked[: req.top_k])
    return _json(answers if batch else answers[0], headers)


async def root(request: Request) -> Response:
    """TEI answers ``POST /`` with the served model's own route: embed, or predict for a classifier."""
    _, engine = _default_model(request)
    return await (embed(request) if engine.info.kind == "embedding" else predict(request))


async def tokenize(request: Request) -> Response:
    svc, engine = _default_model(request)
    req = decode_tei(TeiTokenizeRequest, await read_body(request, svc.config.max_body_bytes))
    texts = tei_texts(req.inputs, field="inputs", max_items=svc.config.max_inputs_per_request)
    if req.prompt_name is not None:
        prompt = engine.prompt(req.prompt_name)
        texts = [prompt + t for t in texts]
    rows = await until_disconnect(request, engine.tokenize(texts, add_special_tokens=req.add_special_tokens))
    return _json([[TeiToken(id=i, text=t, special=sp, start=a, stop=b) for i, t, sp, a, b in row] for row in rows])


async def decode(request: Request) -> Response:
    svc, engine = _default_model(request)
    req = decode_tei(TeiDecodeRequest, await read_body(request, svc.config.max_body_bytes))
    ids, limit = req.ids, engine.info.id_limit
    if isinstance(ids, list) and ids and type(ids[0]) is int:
        ids = [ids]
    if isinstance(ids, list):
        # The same limits as an input to embed: the item count, and each list's length (before looking at ids).
        check_count("ids", len(ids), svc.config.max_inputs_per_request)
        longest = engine.info.max_input_length
        for i, x in enumerate(ids):
            if isinstance(x, list) and len(x) > longest:
                raise ContextLengthExceeded(longest, len(x), index=i)
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(x, list) and all(type(t) is int and 0 <= t < limit for t in x) for x in ids)):
        raise InvalidRequest(f"ids must be an array of token ids (0..{limit - 1}), or an array of such arrays",
                             param="ids")
    texts = await until_disconnect(request, engine.decode(ids, skip_special_tokens=req.skip_special_tokens))
    return _json(texts)


async def info(request: Request) -> Response:
    svc, engine = _default_model(request)
    info = engine.info
    if info.labels is None:
        model_type = {"embedding": {"pooling": info.pooling}}
    else:
        body = {"id2label": {str(i): v for i, v in enumerate(info.labels)},
                "label2id": {v: i for i, v in enumerate(info.labels)}}
        model_type = {"reranker" if info.kind == "rerank" else "classifier": body}
    cfg = svc.config
    return _json(TeiInfo(
        model_id=svc.served_name,
        model_sha=info.commit,
        model_dtype=info.dtype,
        model_type=model_type,
        kind=info.kind,
        dimensions=info.dimensions,
        max_concurrent_requests=info.max_queue,
        max_input_length=info.max_input_length,
        max_batch_tokens=info.max_batch_tokens,
        max_batch_requests=info.max_batch_requests,
        max_client_batch_size=cfg.max_inputs_per_request,
        tokenization_workers=info.tokenizer_workers,
        version=embedserve.__version__,
        device=info.device,
        quantize=info.quantize,
    ))

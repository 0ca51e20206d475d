"""Thin route handlers: parse, check, await the engine, encode."""

from __future__ import annotations

import asyncio
import base64
import hmac
import time
import uuid
from typing import Awaitable

import msgspec
import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from embedserve.engine.interface import INTEGER_ENCODINGS, EmbedOptions
from embedserve.errors import InvalidRequest, PayloadTooLarge, Unauthorized, WrongModelKind, quoted
from embedserve.http.errors import ClientGone
from embedserve.http.state import Service
from embedserve.protocol import (
    BilledUnits,
    CohereMeta,
    EmbeddingItem,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    RerankDocument,
    RerankResponse,
    RerankResult,
    RerankUsage,
    Status,
    TeiRank,
    Usage,
    decode_request,
    decode_rerank,
    encoder,
    parse_input,
)


# Answers with more floats than this are JSON-encoded on a worker thread (about a millisecond of work).
ENCODE_INLINE_FLOATS = 32_768


def service(request: Request) -> Service:
    return request.app.state.service


def check_auth(request: Request, svc: Service) -> None:
    keys = svc.config.api_keys
    if not keys:
        return  # clients send a bearer token regardless; any is fine when none is configured
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip().encode()
    # Compare against every key so the time taken does not tell which prefix matched.
    ok = False
    for key in svc.key_bytes:
        ok |= hmac.compare_digest(token, key)
    if scheme.lower() != "bearer" or not ok:
        raise Unauthorized(
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'."
        )


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"The request body is {int(length)} bytes; this server accepts at most {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body exceeds this server's limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnect(request: Request, work: Awaitable):
    """Await ``work``; if the client goes away first, cancel it (the engine drops its queued inputs) and raise
    :class:`ClientGone` (answered 499)."""
    work = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watcher.cancel()
    if work in done:
        return work.result()
    work.cancel()
    raise ClientGone


def priority_of(request: Request, value: int | None) -> int | None:
    """A request's priority: its body's ``priority``, else its ``X-Priority`` header (for clients that cannot add a
    field), else None (the model's --default-priority). The engine checks the range (0-999)."""
    if value is not None:
        return value
    header = request.headers.get("x-priority")
    if header is None:
        return None
    try:
        return int(header.strip())
    except ValueError:
        raise InvalidRequest(f"the X-Priority header must be an integer from 0 to 999, got {quoted(header)}",
                             param="priority") from None


def integer_rows(rows: list[bytes], name: str) -> list[list[int]]:
    """An integer output type's bytes per input as lists of ints, in one numpy conversion."""
    width = len(rows[0])
    return np.frombuffer(b"".join(rows), dtype=INTEGER_ENCODINGS[name]).reshape(len(rows), width).tolist()


def encode_embeddings(
    vectors, token_counts: list[int], fmt: str, model: str, encoded: dict[str, list[bytes]] | None = None,
    sparse=None, multi=None, matrix: str = "float",
) -> bytes:
    """``vectors [n, k]`` float32 -> response JSON. base64 is little-endian float32, built without a float loop:
    spliced as made by the engine's pool+encode kernel when it made it, else encoded row by row here. The integer
    types are the engine's bytes as integers."""
    ready = (encoded or {}).get(fmt)
    if fmt in ("sparse", "multi_vector"):
        items = [EmbeddingItem(index=i, embedding=one)
                 for i, one in enumerate(_outputs(fmt, vectors, sparse, multi, matrix))]
    elif fmt in INTEGER_ENCODINGS:
        items = [EmbeddingItem(index=i, embedding=row) for i, row in enumerate(integer_rows(ready, fmt))]
    elif fmt == "base64" and ready is not None:
        items = [EmbeddingItem(index=i, embedding=msgspec.Raw(b'"' + text + b'"')) for i, text in enumerate(ready)]
    elif fmt == "base64":
        rows = vectors.numpy().astype("<f4", copy=False)
        items = [
            EmbeddingItem(index=i, embedding=msgspec.Raw(b'"' + base64.b64encode(row.tobytes()) + b'"'))
            for i, row in enumerate(rows)
        ]
    else:
        items = [EmbeddingItem(index=i, embedding=row) for i, row in enumerate(vectors.tolist())]
    total = sum(token_counts)
    return encoder.encode(
        EmbeddingResponse(data=items, model=model, usage=Usage(prompt_tokens=total, total_tokens=total))
    )


def _outputs(fmt: str, vectors, sparse, multi, matrix: str) -> list:
    """Each input's sparse or multi-vector output, as it stands alone or, with others asked for beside it, as one
    object: {multi_vector, dense, indices, values}. ``matrix`` base64: each input's vectors as {shape, base64}
    (the little-endian float32 bytes of the matrix, row after row)."""
    n = len(sparse if sparse is not None else multi)
    dense = vectors.tolist() if vectors.numel() else None  # include_dense asked for them
    out = []
    for i in range(n):
        one = {}
        if multi is not None:
            m = multi[i]
            one["multi_vector"] = m.tolist() if matrix == "float" else {
                "shape": list(m.shape), "base64": msgspec.Raw(b'"' + base64.b64encode(
                    m.numpy().astype("<f4", copy=False).tobytes()) + b'"')}
        if dense is not None:
            one["dense"] = dense[i]
        if sparse is not None:
            one["indices"], one["values"] = sparse[i][0].tolist(), sparse[i][1].tolist()
        out.append(one["multi_vector"] if fmt == "multi_vector" and len(one) == 1 else one)
    return out


def _matrix_format(value: str | None) -> str:
    if value not in (None, "float", "base64"):
        raise InvalidRequest(f"multi_vector_format must be float or base64, got {quoted(value)}",
                             param="multi_vector_format")
    return value or "float"


async def embeddings(request: Request) -> Response:
    svc = service(request)
    check_auth(request, svc)
    svc.require_ready()
    req = decode_request(await read_body(request, svc.config.max_body_bytes))
    name, engine = svc.pick(req.model)
    inputs = parse_input(req.input, max_items=svc.config.max_inputs_per_request)
    fmt = req.encoding_format or "float"
    matrix = _matrix_format(req.multi_vector_format)
    options = EmbedOptions(
        dimensions=req.dimensions, normalize=req.normalize, truncate=req.truncate, prompt_name=req.prompt_name,
        encodings=() if fmt in ("float", "sparse", "multi_vector") else (fmt,),
        late_chunking=bool(req.late_chunking),
        sparse=fmt == "sparse", top_k=req.sparse_top_k, include_dense=bool(req.include_dense),
        multi_vector=fmt == "multi_vector", include_sparse=bool(req.include_sparse),
        late_chunking_overlap=req.late_chunking_overlap, long_input=req.long_input, query=bool(req.is_query),
        priority=priority_of(request, req.priority),
    )
    request.scope["state"]["access"]["inputs"] = len(inputs)
    result = await until_disconnect(request, engine.embed(inputs, options))
    headers = record_result(svc, request, len(inputs), result, engine)
    args = (result.vectors, result.token_counts, fmt, name, result.encoded, result.sparse, result.multi, matrix)
    size = (result.vectors.numel() + sum(len(ids) for ids, _ in result.sparse or ())
            + sum(m.numel() for m in result.multi or ()))
    if size > ENCODE_INLINE_FLOATS:
        body = await run_in_threadpool(encode_embeddings, *args)  # a big answer: keep the event loop free
    else:
        body = encode_embeddings(*args)
    return Response(body, media_type="application/json", headers=headers)


def record_result(svc: Service, request: Request, inputs: int, result, engine) -> dict[str, str]:
    """Metrics and the access log for a finished request; the timing headers it answers with."""
    t = result.timings
    request.scope["state"]["access"].update(inputs=inputs, tokens=result.total_tokens, queue_s=t.queue_s,
                                            kind=engine.info.kind, model=engine.info.name, timings=t,
                                            device=engine.info.device, result_at=time.perf_counter())
    m = svc.metrics
    m.tokens.inc(result.total_tokens)
    m.inputs.inc(inputs)
    m.queue_seconds.observe(t.queue_s)
    m.tokenize_seconds.observe(t.tokenize_s)
    m.inference_seconds.observe(t.inference_s)
    return {
        "x-queue-time": f"{1000 * t.queue_s:.2f}",
        "x-tokenization-time": f"{1000 * t.tokenize_s:.2f}",
        "x-inference-time": f"{1000 * t.inference_s:.2f}",
        "x-total-tokens": str(result.total_tokens),
    }


async def rerank(request: Request) -> Response:
    """Cohere / Jina rerank (``documents``) or TEI's (``texts``): every (query, document) pair scored by the
    cross-encoder in the shared packed engine, answered sorted by score."""
    svc = service(request)
    check_auth(request, svc)
    svc.require_ready()
    req, shape, docs = decode_rerank(await read_body(request, svc.config.max_body_bytes),
                                     max_items=svc.config.max_inputs_per_request)
    name, engine = svc.pick(req.model)
    if engine.info.kind not in ("rerank", "multi_vector"):  # a ColBERT model scores by MaxSim
        raise WrongModelKind("rerank", engine.info.kind, "rerank")
    work = engine.score([(req.query, d) for d in docs], truncate=req.truncate, max_doc_tokens=req.max_tokens_per_doc,
                        priority=priority_of(request, req.priority))
    result = await until_disconnect(request, work)
    headers = record_result(svc, request, len(docs), result, engine)
    logits = result.vectors[:, 0:1]
    raw = shape == "tei" and req.raw_scores
    values = engine.scores(logits, raw=raw)[:, 0].tolist()
    order = sorted(range(len(docs)), key=lambda i: -values[i])
    if shape == "tei":
        body = [TeiRank(index=i, score=values[i], text=docs[i] if req.return_text else None) for i in order]
    else:
        results = [RerankResult(index=i, relevance_score=values[i],
                                document=RerankDocument(text=docs[i]) if req.return_documents else None)
                   for i in order[: req.top_n]]
        total = result.total_tokens
        body = RerankResponse(id=str(uuid.uuid4()), model=name, results=results,
                              usage=RerankUsage(total_tokens=total, prompt_tokens=total),
                              meta=CohereMeta(billed_units=BilledUnits(search_units=1)))
    return Response(encoder.encode(body), media_type="application/json", headers=headers)


async def models(request: Request) -> Response:
    svc = service(request)
    check_auth(request, svc)
    cards = [ModelCard(id=name, created=svc.created, kind=e.info.kind, dimensions=e.info.dimensions)
             for name, e in svc.serving().items()]
    if not cards:  # still loading: the name is known already
        cards = [ModelCard(id=svc.served_name, created=svc.created)]
    return Response(encoder.encode(ModelList(data=cards)), media_type="application/json")


async def metrics(request: Request) -> Response:
    """Prometheus exposition. Open without a key, like the probes (documented)."""
    return Response(service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def health(request: Request) -> Response:
    """Alive: the process answers and its engine has not failed for good. Open without a key (probes carry
    none)."""
    service(request).require_alive()
    return Response(encoder.encode(Status(status="ok")), media_type="application/json")


async def ready(request: Request) -> Response:
    """Ready: the model is loaded and warmed up, and the server is not shutting down."""
    service(request).require_ready()
    return Response(encoder.encode(Status(status="ready")), media_type="application/json")

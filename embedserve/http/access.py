"""Per-request bookkeeping as plain ASGI middleware: request id, trace, one log line, request metrics, in-flight
count.

The request id comes from ``x-request-id`` when the client (or the ingress) sent one, else it is generated;
it is echoed in the response. The trace and span ids (:mod:`embedserve.http.tracing`) are set for the request's
task, so that its log lines carry them; with an OTLP endpoint its spans are exported once it is answered. Handlers
add what only they know (inputs, tokens, queue time, the engine's timings) to ``scope["state"]["access"]``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from embedserve.http import tracing
from embedserve.http.state import Service

log = logging.getLogger("embedserve.access")

# Routes that put work on the engine: counted in flight, so that a drain on SIGTERM waits for them.
WORK_ROUTES = {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/predict",
               "/classify", "/", "/v1/embed", "/v2/embed", "/embed_sparse", "/embed_all"}
_ROUTES = WORK_ROUTES | {"/v1/models", "/models", "/health", "/ready", "/metrics", "/tokenize", "/decode", "/info",
                         "/openapi.json", "/docs"}
_PROBES = ("/health", "/ready", "/metrics")  # logged only when they fail; never traced
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessMiddleware:
    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        clock = (time.time_ns(), time.perf_counter())
        started = clock[1]
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        path = scope["path"]
        parent = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"traceparent"), None)
        tracer = self.service.tracer if path not in _PROBES else None  # probes every few seconds: no spans
        if tracer is not None:
            span, ids = tracer.start(parent, f"{scope['method']} {path}", clock[0])
        else:
            span, ids = None, tracing.ids_from(parent)
        token = tracing.current.set(ids)
        access: dict = {}
        scope.setdefault("state", {})["access"] = access
        status = 500
        embedding = path in WORK_ROUTES and scope["method"] == "POST"
        if embedding:
            self.service.request_started()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if embedding:
                self.service.request_finished()
            answered = time.perf_counter()
            total_s = answered - started
            m = self.service.metrics
            m.requests.labels(path if path in _ROUTES else "other", str(status)).inc()
            if status == 429:
                m.rejected.inc()
            if embedding and status == 200:
                m.request_seconds.observe(total_s)
            if path not in _PROBES or status >= 400:
                fields = {
                    "method": scope["method"], "path": path, "status": status,
                    "kind": access.get("kind", "-"), "model": access.get("model", "-"),
                    "inputs": access.get("inputs", 0),
                    "tokens": access.get("tokens", 0),
                    "queue_ms": round(1000 * access.get("queue_s", 0.0), 2), "total_ms": round(1000 * total_s, 2),
                    "request_id": request_id, "trace_id": ids.trace_id, "span_id": ids.span_id,
                }
                log.info(
                    "%(method)s %(path)s %(status)d kind=%(kind)s model=%(model)s inputs=%(inputs)d "
                    "tokens=%(tokens)d queue_ms=%(queue_ms).1f total_ms=%(total_ms).1f id=%(request_id)s", fields, extra={"fields": fields},
                )
            if span is not None:
                self._export(tracer, span, scope, status, request_id, access, clock, answered, total_s)
            tracing.current.reset(token)

    @staticmethod
    def _export(tracer, span, scope, status: int, request_id: str, access: dict, clock, answered: float,
                total_s: float) -> None:
        """The request's spans to the exporter's queue (never a reason for the request to fail)."""
        path = scope["path"]
        try:
            attributes = {"http.request.method": scope["method"], "http.route": path,
                          "http.response.status_code": status, "embedserve.request_id": request_id,
                          "embedserve.model": access.get("model", "-"), "embedserve.kind": access.get("kind", "-"),
                          "embedserve.inputs": access.get("inputs", 0), "embedserve.tokens": access.get("tokens", 0)}
            tracer.finish(span, attributes, tracing.request_spans(access, clock, answered),
                          clock[0] + int(total_s * 1e9), status >= 500)
        except Exception:  # noqa: BLE001 - a trace is not worth a request
            log.exception("the spans of request %s could not be built", request_id)

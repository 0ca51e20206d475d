"""Per-request bookkeeping as plain ASGI middleware: request id, one log line, request metrics, in-flight count.

The request id comes from ``x-request-id`` when the client (or the ingress) sent one, else it is generated;
it is echoed in the response. Handlers add what only they know (inputs, tokens, queue time) to
``scope["state"]["access"]``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from embedserve.http.state import Service

log = logging.getLogger("embedserve.access")

# Routes that put work on the engine: counted in flight, so that a drain on SIGTERM waits for them.
WORK_ROUTES = {"/v1/embeddings", "/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/embed", "/predict",
               "/classify", "/"}
_ROUTES = WORK_ROUTES | {"/v1/models", "/models", "/health", "/ready", "/metrics", "/tokenize", "/decode", "/info",
                         "/openapi.json", "/docs"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessMiddleware:
    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        access: dict = {}
        scope.setdefault("state", {})["access"] = access
        status = 500
        path = scope["path"]
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
            total_s = time.perf_counter() - started
            m = self.service.metrics
            m.requests.labels(path if path in _ROUTES else "other", str(status)).inc()
            if status == 429:
                m.rejected.inc()
            if embedding and status == 200:
                m.request_seconds.observe(total_s)
            if path not in ("/health", "/ready", "/metrics") or status >= 400:
                fields = {
                    "method": scope["method"], "path": path, "status": status,
                    "kind": access.get("kind", "-"), "model": access.get("model", "-"),
                    "inputs": access.get("inputs", 0),
                    "tokens": access.get("tokens", 0),
                    "queue_ms": round(1000 * access.get("queue_s", 0.0), 2), "total_ms": round(1000 * total_s, 2),
                    "request_id": request_id,
                }
                log.info(
                    "%(method)s %(path)s %(status)d kind=%(kind)s model=%(model)s inputs=%(inputs)d "
                    "tokens=%(tokens)d queue_ms=%(queue_ms).1f total_ms=%(total_ms).1f id=%(request_id)s", fields, extra={"fields": fields},
                )

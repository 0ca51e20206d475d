"""Running the app under uvicorn, with a drain on SIGTERM, and the log format.

On the first SIGTERM (or SIGINT) the server keeps listening but answers new embedding requests with 503
and ``/ready`` with 503, waits until every accepted request is answered (at most ``shutdown_grace_s``),
then lets uvicorn close and the engine stop; the process exits 0. A second signal exits at once.

When the engine stops for good (a CUDA error that poisons the context), every request it held has been
answered (500 or 503), ``/health`` and ``/ready`` answer 503 from then on, and the process exits with
:data:`EXIT_ENGINE_FAILED` once ``shutdown_grace_s`` has passed (load balancers see the 503s and move
traffic first), so that Docker's restart policy or Kubernetes restarts it. A model that fails to load exits
with :data:`EXIT_LOAD_FAILED` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import uvicorn

from embedserve import __version__
from embedserve.config import Config
from embedserve.http import tracing
from embedserve.http.app import create_app

log = logging.getLogger("embedserve")

EXIT_LOAD_FAILED = 1
EXIT_ENGINE_FAILED = 3


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        ids = tracing.current.get()  # a line logged on behalf of a request: its trace
        if ids is not None:
            out.update(trace_id=ids.trace_id, span_id=ids.span_id)
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


# Control characters (and Unicode's line and paragraph separators) in a message: a request path or any other
# client text must never start a line of its own in the plain log.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, 0x85]} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


class PlainFormatter(logging.Formatter):
    """``time level logger: message``, the message on one line whatever it quotes; tracebacks follow as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(PlainFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers go through the same handler and format.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, grace_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.grace_s = grace_s
        self._drain: asyncio.Task | None = None

    def handle_exit(self, sig, frame) -> None:
        if self._drain is not None or self.should_exit:
            return super().handle_exit(sig, frame)  # a second signal: stop now
        self._drain = asyncio.get_event_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        svc = self.app.state.service
        log.info("shutdown requested: draining %d in-flight requests (grace %.0f s)", svc.in_flight, self.grace_s)
        try:
            await asyncio.wait_for(svc.drain(), self.grace_s)
            log.info("drained; stopping")
        except asyncio.TimeoutError:
            log.warning("grace period over with %d requests still in flight; stopping anyway", svc.in_flight)
        self.should_exit = True


def run(config: Config) -> int:
    exit_code = 0
    server: _DrainingServer | None = None
    sc = config.server

    def on_load_failure(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = EXIT_LOAD_FAILED
        assert server is not None
        server.should_exit = True

    def on_engine_failure(exc: BaseException) -> None:
        nonlocal exit_code
        exit_code = EXIT_ENGINE_FAILED
        log.critical("engine failed: /health and /ready answer 503; exiting with %d in %.0f s for a restart",
                     EXIT_ENGINE_FAILED, sc.shutdown_grace_s)
        assert server is not None
        asyncio.get_running_loop().call_later(sc.shutdown_grace_s, setattr, server, "should_exit", True)

    app = create_app(config, on_load_failure=on_load_failure, on_engine_failure=on_engine_failure)
    server = _DrainingServer(
        uvicorn.Config(app, host=sc.host, port=sc.port, log_config=None, access_log=False,
                       timeout_graceful_shutdown=max(1, int(sc.shutdown_grace_s))),
        app,
        sc.shutdown_grace_s,
    )
    log.info("embedserve %s starting on http://%s:%d", __version__, sc.host, sc.port)
    server.run()
    return exit_code

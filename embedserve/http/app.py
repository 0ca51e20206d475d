"""The Starlette application factory.

The process answers ``/health`` at once; the model loads and warms up on a background thread, and
``/ready`` turns 200 only after that. A model that fails to load stops the server with the error logged.
An engine that stops for good (a device error) turns ``/health`` and ``/ready`` to 503 at once and calls
``on_engine_failure``, which makes the server exit after its grace period.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from embedserve.config import Config, ServedModel
from embedserve.http.access import AccessMiddleware
from embedserve.http.errors import EXCEPTION_HANDLERS
from embedserve.http.metrics import EngineMetrics
from embedserve.http.openapi import OPERATIONS, swagger_ui_assets
from embedserve.http.state import Service

log = logging.getLogger(__name__)


def create_app(
    config: Config,
    *,
    engine: Any = None,
    on_load_failure: Callable[[BaseException], None] | None = None,
    on_engine_failure: Callable[[BaseException], None] | None = None,
) -> Starlette:
    """``engine``: an already started engine (tests pass a fake); None loads ``config.engine`` in the background.
    Both callbacks run on the event loop."""
    served = config.server.served_model_name or Path(config.engine.model.path).name
    svc = Service(config.server, served)
    if config.server.otlp_endpoint:
        from embedserve.http.tracing import OtlpSettings, Tracer

        svc.tracer = Tracer(OtlpSettings(config.server.otlp_endpoint, config.server.otlp_service_name,
                                         config.server.otlp_protocol))

    @asynccontextmanager
    async def lifespan(app: Starlette):
        loop = asyncio.get_running_loop()
        if engine is not None:
            svc.engine = engine
        else:
            def engine_failed(exc: BaseException) -> None:  # on the event loop
                svc.engine_failed(exc)
                if on_engine_failure is not None:
                    on_engine_failure(exc)

            def model_stopped(name: str, exc: BaseException, lost: str) -> None:  # on the event loop
                if len(svc.engines) > 1 and lost == "model":
                    # The model's own engine stopped; the device is fine: the other models go on.
                    log.error("model %r stopped (%s: %s); the other models still serve", name, type(exc).__name__, exc)
                    svc.model_failed(name, exc)
                else:  # one model, or a device fault that poisons every model on it
                    engine_failed(exc)

            def load() -> None:
                from embedserve.engine.fleet import start_engines  # torch and the models: not for a fake engine

                models = [ServedModel(name=svc.served_name, engine=config.engine), *config.more_models]
                try:
                    loaded = start_engines(
                        models, observer=EngineMetrics(svc.metrics),
                        on_stopped=lambda name, exc, lost: loop.call_soon_threadsafe(model_stopped, name, exc, lost))
                except BaseException as exc:  # noqa: BLE001 - reported, then the server stops
                    log.error("start-up failed: %s", exc)
                    if on_load_failure is not None:
                        loop.call_soon_threadsafe(on_load_failure, exc)
                    return
                loop.call_soon_threadsafe(svc.set_engines, loaded)
                log.info("ready: serving %s", ", ".join(repr(n) for n in loaded))

            threading.Thread(target=load, name="embedserve-load", daemon=True).start()
        try:
            yield
        finally:
            svc.shutting_down = True
            if engine is None:
                for e in svc.engines.values():
                    await loop.run_in_executor(None, e.shutdown)
            if svc.tracer is not None:  # the spans still queued, within the exporter's timeout
                await loop.run_in_executor(None, svc.tracer.shutdown)

    app = Starlette(
        routes=[
            *(Route(op.path, op.endpoint, methods=[op.method]) for op in OPERATIONS),
            Mount("/docs/assets", StaticFiles(directory=swagger_ui_assets()), name="docs-assets"),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(AccessMiddleware, service=svc)],
        lifespan=lifespan,
    )
    app.state.service = svc
    return app

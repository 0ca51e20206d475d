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

from embedserve.config import Config
from embedserve.http.access import AccessMiddleware
from embedserve.http.errors import EXCEPTION_HANDLERS
from embedserve.http.openapi import OPERATIONS, swagger_ui_assets
from embedserve.http.state import Service

log = logging.getLogger(__name__)


def _load_engines(config: Config, svc: Service, on_fatal: Callable[[str, BaseException], None]) -> dict:
    """Every model loaded, then each warmed up with all the weights resident, then all started: {served name:
    engine}. With several models their engines share the device in turns, so what must fit is every model's
    weights plus the largest step of any one; each warm-up runs its largest step beside all the weights, so a
    set that cannot fit fails here, naming the models and the flag to lower. A model that fails to load stops
    the start-up, named."""
    from embedserve.config import ServedModel
    from embedserve.engine.device import memory_words
    from embedserve.engine.front import Engine
    from embedserve.engine.turns import DeviceTurns
    from embedserve.errors import ConfigError, EmbedServeError
    from embedserve.http.metrics import EngineMetrics

    models = [ServedModel(name=svc.served_name, engine=config.engine), *config.more_models]
    turns = DeviceTurns() if len(models) > 1 else None
    engines: dict = {}
    names = ", ".join(m.name for m in models)
    try:
        for stage in ("load", "warm up"):
            for m in models:
                try:
                    if stage == "load":
                        engines[m.name] = Engine(
                            m.engine, observer=EngineMetrics(svc.metrics), turns=turns, name=m.name,
                            on_fatal=lambda exc, name=m.name: on_fatal(name, exc))
                    else:
                        engines[m.name].warmup()
                except EmbedServeError as e:
                    if len(models) == 1:
                        raise
                    beside = f", beside the weights of {names}" if stage == "warm up" else ""
                    raise ConfigError(f"model {m.name!r} ({m.engine.model.path}) failed to {stage}{beside}: "
                                      f"{e.message}") from e
        devices = {e.device: None for e in engines.values()}
        log.info("memory after every warm-up: %s", "; ".join(memory_words(d) for d in devices))
        for engine in engines.values():
            engine.start()
    except BaseException:
        for engine in engines.values():
            engine.shutdown()
        raise
    return engines


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

            def model_failed(name: str, exc: BaseException) -> None:  # on the event loop
                from embedserve.engine.faults import classify

                if len(svc.engines) > 1 and classify(exc) != "fatal":
                    # The model's own engine stopped; the device is fine: the other models go on.
                    log.error("model %r stopped (%s: %s); the other models still serve", name, type(exc).__name__, exc)
                    svc.model_failed(name, exc)
                else:  # one model, or a device fault that poisons every model on it
                    engine_failed(exc)

            def load() -> None:
                try:
                    loaded = _load_engines(config, svc,
                                           lambda name, exc: loop.call_soon_threadsafe(model_failed, name, exc))
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

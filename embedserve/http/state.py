"""What the handlers share: the configuration, the engine once it is ready, metrics and the lifecycle flags."""

from __future__ import annotations

import asyncio
import time

from embedserve.config import ServerConfig
from embedserve.engine.interface import ServedEngine
from embedserve.errors import EngineFailed, NotFound, ServiceUnavailable, ShuttingDown, quoted
from embedserve.http.metrics import Metrics, ModelSnapshot, Snapshot


class Service:
    def __init__(self, config: ServerConfig, served_name: str) -> None:
        self.config = config
        self.served_name = served_name
        self.key_bytes = tuple(k.encode() for k in config.api_keys)
        self.created = int(time.time())
        self.engine: ServedEngine | None = None  # the default model's, set once every model is loaded and warmed up
        self.engines: dict[str, ServedEngine] = {}  # served name -> engine, every model (set with ``engine``)
        self.failed_models: dict[str, BaseException] = {}  # engines stopped by a fault of their own
        self.shutting_down = False
        self.failure: BaseException | None = None  # the engine stopped for good; the process is on its way out
        self.metrics: Metrics = Metrics(self.snapshot)
        self.in_flight = 0
        self._drained: asyncio.Event | None = None
        self.tracer = None  # an embedserve.http.tracing.Tracer when --otlp-endpoint is set

    def set_engines(self, engines: dict[str, ServedEngine]) -> None:
        """Every model is loaded and warmed up: the first is the default one. Event-loop thread."""
        self.engines = dict(engines)
        self.engine = next(iter(self.engines.values()))

    def serving(self) -> dict[str, ServedEngine]:
        """Served name -> engine of every model ready to serve (empty while loading); an engine handed over as
        ``engine`` alone (the tests' fakes) counts as the one model."""
        return self.engines or ({self.served_name: self.engine} if self.engine is not None else {})

    def snapshot(self) -> Snapshot:
        """Every serving model's queue, for the metrics scrape."""
        engines = self.serving()
        models = [ModelSnapshot(name, e.info.kind, *e.queue_stats(), max_queue=e.info.max_queue,
                                failed=name in self.failed_models, by_priority=e.waiting_by_priority())
                  for name, e in engines.items()]
        return Snapshot(models, self.in_flight, bool(engines) and not self.shutting_down)

    def model_failed(self, name: str, exc: BaseException) -> None:
        """One model's engine stopped by a fault of its own (the device is fine): only its requests fail."""
        self.failed_models[name] = exc

    def engine_failed(self, exc: BaseException) -> None:
        self.failure = exc
        self.shutting_down = True

    def require_alive(self) -> None:
        if self.failure is not None:
            raise EngineFailed("The inference engine stopped after a device error; this replica is restarting.")

    def require_ready(self) -> ServedEngine:
        self.require_alive()
        if self.shutting_down:
            raise ShuttingDown("The server is shutting down; retry the request.")
        if self.engine is None:
            raise ServiceUnavailable("The model is still loading; retry shortly.")
        return self.engine

    def pick(self, name: str | None) -> tuple[str, ServedEngine]:
        """The (served name, engine) a request's ``model`` names. One model answers any name (clients send
        their own defaults) unless --reject-unknown-model; with several, no name means the first, and an unknown
        one is a 404 that lists them. Call :meth:`require_ready` first, as the request arrives: a request already
        accepted is answered even if a drain begins while its body is read."""
        default = self.engine
        if default is None:
            raise ServiceUnavailable("The model is still loading; retry shortly.")
        if name in self.failed_models or (name is None and self.served_name in self.failed_models):
            raise EngineFailed(f"The model {quoted(name or self.served_name)} stopped after an internal error; "
                               "the other models still serve. It comes back when the server restarts.")
        if len(self.engines) <= 1:
            if self.config.reject_unknown_model and name is not None and name != self.served_name:
                raise NotFound(f"The model {quoted(name)} does not exist; this server serves '{self.served_name}'.",
                               param="model", code="model_not_found")
            return self.served_name, default
        if name is None:
            return self.served_name, default
        engine = self.engines.get(name)
        if engine is None:
            raise NotFound(f"The model {quoted(name)} does not exist; this server serves: "
                           f"{', '.join(self.engines)}.", param="model", code="model_not_found")
        return name, engine

    # In-flight embedding requests, for the drain on SIGTERM. Event-loop thread only.
    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._drained is not None:
            self._drained.set()

    async def drain(self) -> None:
        """Stop taking embedding requests (503 from now on) and wait until every accepted one is answered."""
        self.shutting_down = True
        self._drained = asyncio.Event()
        if self.in_flight == 0:
            self._drained.set()
        await self._drained.wait()

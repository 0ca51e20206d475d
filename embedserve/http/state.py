"""What the handlers share: the configuration, the engine once it is ready, metrics and the lifecycle flags."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from embedserve.config import ServerConfig
from embedserve.errors import EngineFailed, ServiceUnavailable, ShuttingDown
from embedserve.http.metrics import Metrics

if TYPE_CHECKING:
    from embedserve.engine.front import Engine


class Service:
    def __init__(self, config: ServerConfig, served_name: str) -> None:
        self.config = config
        self.served_name = served_name
        self.key_bytes = tuple(k.encode() for k in config.api_keys)
        self.created = int(time.time())
        self.engine: Engine | None = None  # set once loaded and warmed up
        self.shutting_down = False
        self.failure: BaseException | None = None  # the engine stopped for good; the process is on its way out
        self.metrics: Metrics = Metrics(self)
        self.in_flight = 0
        self._drained: asyncio.Event | None = None

    def engine_failed(self, exc: BaseException) -> None:
        self.failure = exc
        self.shutting_down = True

    def require_alive(self) -> None:
        if self.failure is not None:
            raise EngineFailed("The inference engine stopped after a device error; this replica is restarting.")

    def require_ready(self) -> Engine:
        self.require_alive()
        if self.shutting_down:
            raise ShuttingDown("The server is shutting down; retry the request.")
        if self.engine is None:
            raise ServiceUnavailable("The model is still loading; retry shortly.")
        return self.engine

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

"""What the handlers share: the configuration, the engine once it is ready, and the lifecycle flags."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from embedserve.config import ServerConfig
from embedserve.errors import ServiceUnavailable, ShuttingDown

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

    def require_ready(self) -> Engine:
        if self.shutting_down:
            raise ShuttingDown("The server is shutting down; retry the request.")
        if self.engine is None:
            raise ServiceUnavailable("The model is still loading; retry shortly.")
        return self.engine

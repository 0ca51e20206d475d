"""The set of models a server runs: each loaded, then each warmed up beside all the weights, then all started.

With several models their engines share the device in turns (:class:`DeviceTurns`), so what must fit is every
model's weights plus the largest step of any one; each warm-up runs its largest step beside all the weights, so a
set that cannot fit fails here, naming the models and the flag to lower. A model that fails to load stops the
start-up, named.
"""

from __future__ import annotations

import logging
from typing import Callable, Literal, Sequence

from embedserve.config import ServedModel
from embedserve.engine.device import memory_words
from embedserve.engine.faults import classify
from embedserve.engine.front import Engine
from embedserve.engine.interface import StepObserver
from embedserve.engine.turns import DeviceTurns
from embedserve.errors import ConfigError, EmbedServeError

log = logging.getLogger(__name__)

Lost = Literal["device", "model"]


def start_engines(models: Sequence[ServedModel], *, observer: StepObserver,
                  on_stopped: Callable[[str, BaseException, Lost], None]) -> dict[str, Engine]:
    """{served name: started engine}, in the order given (the first is the default model).

    ``on_stopped(name, exc, lost)``: called from that engine's thread once it has stopped for good. ``lost`` says
    what the fault took: ``"device"`` (a CUDA error that poisons the context: every model on it is gone) or
    ``"model"`` (that engine's own fault; the device and the other models are fine)."""

    def stopped(name: str) -> Callable[[BaseException], None]:
        return lambda exc: on_stopped(name, exc, "device" if classify(exc) == "fatal" else "model")

    turns = DeviceTurns() if len(models) > 1 else None
    engines: dict[str, Engine] = {}
    names = ", ".join(m.name for m in models)
    try:
        for stage in ("load", "warm up"):
            for m in models:
                try:
                    if stage == "load":
                        engines[m.name] = Engine(m.engine, observer=observer, turns=turns, name=m.name,
                                                 on_fatal=stopped(m.name))
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

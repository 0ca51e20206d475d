"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Counters and histograms are updated where things happen (requests in the middleware, forward passes by the
engine thread through :class:`EngineMetrics`); queue depth comes from a :class:`Snapshot` the service makes
when scraped (this module knows nothing of the service or the engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class ModelSnapshot:
    """One served model's queue at scrape time."""

    name: str
    kind: str
    waiting: int  # inputs
    tokens: int  # of the inputs waiting
    running: int  # inputs in a forward pass
    dropped: int  # inputs dropped by cancellation so far
    max_queue: int
    failed: bool  # its engine stopped by a fault of its own
    by_priority: dict[int, int] = field(default_factory=dict)  # inputs waiting per priority level


@dataclass(frozen=True)
class Snapshot:
    """What the scrape-time gauges read; the service makes one per scrape."""

    models: list[ModelSnapshot]
    in_flight: int
    ready: bool


class _QueueCollector:
    """Queue depth and dropped inputs, read at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self):
        snap = self.snapshot()
        models = snap.models
        waiting, tokens, running, dropped = (sum(getattr(m, k) for m in models)
                                             for k in ("waiting", "tokens", "running", "dropped"))
        yield GaugeMetricFamily("embedserve_queue_inputs", "Inputs waiting for a forward pass", value=waiting)
        yield GaugeMetricFamily("embedserve_queue_tokens", "Tokens of the inputs waiting", value=tokens)
        yield GaugeMetricFamily("embedserve_running_inputs", "Inputs in the forward pass now", value=running)
        yield CounterMetricFamily(
            "embedserve_dropped_inputs", "Queued inputs dropped because their client went away", value=dropped
        )
        yield GaugeMetricFamily("embedserve_in_flight_requests",
                                "Requests with engine work (embed, rerank, classify) accepted and not yet answered",
                                value=snap.in_flight)
        yield GaugeMetricFamily("embedserve_ready", "1 when the model is loaded and not draining",
                                value=float(snap.ready))
        if models:
            info = GaugeMetricFamily("embedserve_model_info", "Each served model and its kind (embedding, sparse, "
                                     "rerank, classify); always 1", labels=["model", "kind"])
            per_model = {
                "waiting": GaugeMetricFamily("embedserve_model_queue_inputs", "Inputs waiting, per model",
                                             labels=["model"]),
                "tokens": GaugeMetricFamily("embedserve_model_queue_tokens", "Tokens waiting, per model",
                                            labels=["model"]),
                "running": GaugeMetricFamily("embedserve_model_running_inputs", "Inputs in a forward pass, per model",
                                             labels=["model"]),
                "max_queue": GaugeMetricFamily("embedserve_model_max_queue", "Inputs a model queues before 429",
                                               labels=["model"]),
                "failed": GaugeMetricFamily("embedserve_model_failed", "1 once a model's engine stopped by a fault "
                                            "of its own (the other models still serve)", labels=["model"]),
            }
            by_priority = GaugeMetricFamily("embedserve_model_queue_inputs_by_priority",
                                            "Inputs waiting, per model and priority (0-999, lower first)",
                                            labels=["model", "priority"])
            for m in models:
                info.add_metric([m.name, m.kind], 1.0)
                for key, family in per_model.items():
                    family.add_metric([m.name], float(getattr(m, key)))
                for level, n in sorted(m.by_priority.items()):
                    by_priority.add_metric([m.name, str(level)], float(n))
            yield info
            yield from per_model.values()
            yield by_priority


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        """``snapshot``: called at each scrape for the queue gauges."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("embedserve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.request_seconds = Histogram("embedserve_request_seconds", "Total time of embedding requests",
                                         buckets=_LATENCY, registry=r)
        self.queue_seconds = Histogram("embedserve_queue_seconds", "Time queued before the first forward pass",
                                       buckets=_LATENCY, registry=r)
        self.tokenize_seconds = Histogram("embedserve_tokenize_seconds", "Tokenisation time per request",
                                          buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("embedserve_inference_seconds",
                                           "From the first forward pass to the last, per request",
                                           buckets=_LATENCY, registry=r)
        self.tokens = Counter("embedserve_tokens", "Tokens embedded", registry=r)
        self.inputs = Counter("embedserve_inputs", "Inputs embedded", registry=r)
        self.rejected = Counter("embedserve_rejected", "Requests refused because the queue was full (429)",
                                registry=r)
        self.batch_inputs = Histogram("embedserve_batch_inputs", "Inputs per forward pass", buckets=_SIZES,
                                      registry=r)
        self.batch_tokens = Histogram("embedserve_batch_tokens", "Tokens per forward pass", buckets=_TOKENS,
                                      registry=r)
        self.batch_seconds = Histogram("embedserve_batch_seconds", "Forward pass time", buckets=_LATENCY,
                                       registry=r)
        self.engine_errors = Counter("embedserve_engine_errors", "Forward passes that failed", registry=r)
        self.oom_splits = Counter("embedserve_oom_splits", "Steps that ran out of device memory and were retried "
                                  "in parts", registry=r)
        r.register(_QueueCollector(snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineMetrics:
    """The engine's :class:`StepObserver`, writing into :class:`Metrics`."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def step(self, inputs: int, tokens: int, seconds: float) -> None:
        self.m.batch_inputs.observe(inputs)
        self.m.batch_tokens.observe(tokens)
        self.m.batch_seconds.observe(seconds)

    def step_failed(self, inputs: int) -> None:
        self.m.engine_errors.inc()

    def step_split(self, inputs: int) -> None:
        self.m.oom_splits.inc()

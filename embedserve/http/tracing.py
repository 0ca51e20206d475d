"""Request traces: OpenTelemetry spans over OTLP (optional: ``pip install embedserve[otel]``), and the trace and span
ids every log line of a request carries.

Each request gets a trace id and a span id: from the OpenTelemetry SDK's server span when an endpoint is set, else
made here (the trace id taken from a W3C ``traceparent`` header when the client sent one). They live in a context
variable for the request's task, so the JSON log formatter adds them to each line logged on its behalf.

With an endpoint (``--otlp-endpoint``), a request's server span (route, model, status, inputs, tokens; its parent
from ``traceparent``) gets child spans built when it is answered, from the times the engine recorded: tokenisation,
the queue wait, each forward step it took part in (the step's tokens and inputs, the device) and the response's
encoding. A ``BatchSpanProcessor`` exports them from its own thread: a request never waits for the collector, the
queue drops spans when the collector cannot keep up, and the exporter's failures are logged at most once a
minute. Without an endpoint, nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextvars
import logging
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
EXPORT_TIMEOUT_S = 5.0  # one export call to the collector, at most
QUIET_S = 60.0  # OpenTelemetry's own warnings (a collector that is down): one line per logger per minute


@dataclass(frozen=True)
class TraceIds:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the request's server span


current: contextvars.ContextVar[TraceIds | None] = contextvars.ContextVar("embedserve_trace", default=None)


def ids_from(traceparent: str | None) -> TraceIds:
    """A request's ids without OpenTelemetry: its trace from a valid ``traceparent``, else a new one."""
    found = _TRACEPARENT.match(traceparent.strip().lower()) if traceparent else None
    trace = found.group(1) if found and found.group(1) != "0" * 32 else secrets.token_hex(16)
    return TraceIds(trace, secrets.token_hex(8))


@dataclass(frozen=True)
class OtlpSettings:
    endpoint: str  # the collector's base URL (OTLP/HTTP posts to endpoint/v1/traces); host:port for gRPC
    service_name: str = "embedserve"
    protocol: str = "http/protobuf"  # or grpc, where its exporter package is installed


class _Quiet(logging.Filter):
    """OpenTelemetry's records at most once a minute per logger: a collector that is down costs a line now and then."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("opentelemetry"):
            return True
        now = time.monotonic()
        if now - self._last.get(record.name, -QUIET_S) < QUIET_S:
            return False
        self._last[record.name] = now
        return True


class Tracer:
    """Builds and exports the spans of each request (:meth:`start`, then :meth:`finish`)."""

    def __init__(self, settings: OtlpSettings) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if settings.protocol == "grpc":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
            except ImportError as e:
                raise RuntimeError("OTLP over gRPC needs opentelemetry-exporter-otlp-proto-grpc; install it, or use "
                                   "http/protobuf (embedserve[otel])") from e
            exporter = Grpc(endpoint=settings.endpoint, timeout=EXPORT_TIMEOUT_S)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = settings.endpoint.rstrip("/") + "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT_S)
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=8192,
                                                            schedule_delay_millis=500))
        self.tracer = self.provider.get_tracer("embedserve")
        self._propagator = TraceContextTextMapPropagator()
        quiet = _Quiet()
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet)
        log.info("traces: OTLP %s to %s as service %r", settings.protocol, settings.endpoint, settings.service_name)

    def start(self, traceparent: str | None, name: str, start_ns: int) -> tuple[Any, TraceIds]:
        """The request's server span (its parent from ``traceparent``) and its ids."""
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract({"traceparent": traceparent} if traceparent else {})
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, start_time=start_ns)
        ctx = span.get_span_context()
        return span, TraceIds(format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))

    def finish(self, span: Any, attributes: dict[str, Any], children: list[tuple[str, int, int, dict]], end_ns: int,
               error: bool) -> None:
        """Ends the server span at ``end_ns`` with its attributes, and its children (name, start, end,
        attributes), all ended already."""
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        parent = set_span_in_context(span)
        for name, start, end, attrs in children:
            self.tracer.start_span(name, context=parent, start_time=start, attributes=attrs).end(end_time=end)
        span.set_attributes(attributes)
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()


def request_spans(access: dict, clock: tuple[int, float], answered: float) -> list[tuple[str, int, int, dict]]:
    """A finished request's child spans from what its handler recorded in ``access``: ``timings`` (the engine's
    :class:`~embedserve.engine.interface.Timings`), ``device``, ``result_at`` (``time.perf_counter`` when the
    engine's result was in). ``clock``: (``time.time_ns()``, ``time.perf_counter()``) read together at the start;
    ``answered``: ``time.perf_counter`` when the response was sent."""
    wall0, perf0 = clock

    def ns(t: float) -> int:
        return wall0 + int((t - perf0) * 1e9)

    t = access.get("timings")
    if t is None or not t.queued_at:
        return []
    out = [("tokenize", ns(t.queued_at - t.tokenize_s), ns(t.queued_at), {"embedserve.inputs": access.get("inputs", 0)}),
           ("queue", ns(t.queued_at), ns(t.queued_at + t.queue_s), {})]
    device = str(access.get("device", ""))
    for s in t.steps:
        out.append(("forward", ns(s.start), ns(s.end), {"embedserve.step.tokens": s.tokens,
                                                        "embedserve.step.inputs": s.inputs,
                                                        "embedserve.device": device}))
    if "result_at" in access:
        out.append(("encode", ns(access["result_at"]), ns(answered), {}))
    return out

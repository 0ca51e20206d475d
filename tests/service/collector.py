"""A test OpenTelemetry collector on 127.0.0.1: receives OTLP/HTTP protobuf trace exports and keeps every span,
decoded with opentelemetry-proto (the wire format's own definitions)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Collector:
    def __init__(self) -> None:
        self.spans: list = []  # opentelemetry.proto.trace.v1.trace_pb2.Span, as received
        self.resources: list = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                    ExportTraceServiceResponse,
                )

                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector._lock:
                    collector.paths.append(self.path)
                    for rs in request.resource_spans:
                        collector.resources.append(rs.resource)
                        for scope in rs.scope_spans:
                            collector.spans.extend(scope.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def of_trace(self, trace_id: str) -> list:
        with self._lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


def attributes(span) -> dict:
    """A span's attributes as {key: (kind, value)}: kind is the AnyValue field set (int_value, string_value ...)."""
    out = {}
    for kv in span.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = (kind, getattr(kv.value, kind))
    return out

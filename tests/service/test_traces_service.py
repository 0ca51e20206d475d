"""Traces and trace ids over a live server: spans exported over OTLP/HTTP to a test collector on 127.0.0.1 (decoded
with opentelemetry-proto), the parent taken from a W3C traceparent header, child spans with numeric attributes; a
collector that is down costs the requests nothing; JSON log lines carry the request's trace and span ids."""

from __future__ import annotations

import json
import secrets
import socket

import httpx
import pytest

from collector import Collector, attributes
from polling import until
from serving import run_server

TEXTS = ["what is a trace", "spans join services", "a"]


def traceparent() -> tuple[str, str, str]:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace}-{parent}-01", trace, parent


def access_lines(server) -> list[dict]:
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    return [x for x in lines if x.get("logger") == "embedserve.access"]


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    with Collector() as collector, run_server(tmp_path_factory.mktemp("traced"), "--otlp-endpoint", collector.url,
                                              "--otlp-service-name", "embed-test", "--log-format", "json") as server:
        yield server, collector


def test_a_request_with_a_traceparent_is_its_child_with_the_engines_spans(traced):
    server, collector = traced
    header, trace, parent = traceparent()
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": TEXTS},
                   headers={"traceparent": header}, timeout=60)
    assert r.status_code == 200
    until(lambda: any(s.name == "encode" for s in collector.of_trace(trace)), "the request's spans at the collector",
          timeout=30)
    spans = collector.of_trace(trace)
    (root,) = [s for s in spans if s.parent_span_id.hex() == parent]
    assert root.name == "POST /v1/embeddings" and root.kind == root.SPAN_KIND_SERVER
    attrs = attributes(root)
    assert attrs["http.response.status_code"] == ("int_value", 200)
    assert attrs["embedserve.inputs"] == ("int_value", 3)
    assert attrs["embedserve.tokens"][0] == "int_value" and attrs["embedserve.tokens"][1] >= 3 + 2 * 3
    assert attrs["embedserve.model"] == ("string_value", "all-MiniLM-L6-v2")  # the served name
    children = [s for s in spans if s.parent_span_id == root.span_id]
    names = [s.name for s in children]
    assert {"tokenize", "queue", "forward", "encode"} <= set(names)
    for s in children:
        assert root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= root.end_time_unix_nano
    forward = attributes(next(s for s in children if s.name == "forward"))
    assert forward["embedserve.step.tokens"][0] == "int_value" and forward["embedserve.step.tokens"][1] >= 9
    assert forward["embedserve.step.inputs"][0] == "int_value" and forward["embedserve.device"] == ("string_value",
                                                                                                   "cpu")
    assert collector.paths and set(collector.paths) == {"/v1/traces"}
    assert not any(s.name.endswith(("/ready", "/health", "/metrics")) for s in collector.spans)  # probes: none
    service = {kv.key: kv.value.string_value for r in collector.resources for kv in r.attributes}
    assert service["service.name"] == "embed-test"
    # The access line of that request carries its trace and its server span.
    until(lambda: any(x.get("trace_id") == trace for x in access_lines(server)), "the access line", timeout=10)
    line = next(x for x in access_lines(server) if x.get("trace_id") == trace)
    assert line["span_id"] == root.span_id.hex() and line["path"] == "/v1/embeddings" and line["inputs"] == 3


def test_without_a_traceparent_each_request_is_a_new_trace(traced):
    server, collector = traced
    before = {x["trace_id"] for x in access_lines(server)}
    assert httpx.post(server.url + "/embed", json={"inputs": "x"}, timeout=60).status_code == 200
    until(lambda: len({x["trace_id"] for x in access_lines(server)} - before) == 1, "a new trace id", timeout=10)
    (trace,) = {x["trace_id"] for x in access_lines(server)} - before
    until(lambda: collector.of_trace(trace), "its spans", timeout=30)
    (root,) = [s for s in collector.of_trace(trace) if not s.parent_span_id]
    assert root.name == "POST /embed"


def test_a_collector_that_is_down_costs_the_requests_nothing(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with run_server(tmp_path, "--otlp-endpoint", dead) as server:
        for _ in range(20):
            assert httpx.post(server.url + "/v1/embeddings", json={"model": "m", "input": TEXTS},
                              timeout=60).status_code == 200
    assert "Traceback" not in server.output()
    # The exporter's complaints: a line now and then (at most one a minute per logger), not one per request.
    assert sum("opentelemetry" in line for line in server.output().splitlines()) <= 4


def test_without_an_endpoint_nothing_of_opentelemetry_is_imported(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from embedserve.config import Config, EngineConfig, ModelConfig; "
            "from embedserve.http.app import create_app; from embedserve.http import access; "
            "create_app(Config(engine=EngineConfig(model=ModelConfig(path='x')))); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_json_log_lines_carry_the_traceparents_trace_without_an_exporter(tmp_path):
    header, trace, _ = traceparent()
    with run_server(tmp_path, "--log-format", "json") as server:
        assert httpx.post(server.url + "/embed", json={"inputs": "x"}, headers={"traceparent": header},
                          timeout=60).status_code == 200
        until(lambda: any(x.get("trace_id") == trace for x in access_lines(server)), "the access line", timeout=10)
    line = next(x for x in access_lines(server) if x.get("trace_id") == trace)
    assert len(line["span_id"]) == 16 and line["status"] == 200

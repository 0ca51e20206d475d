"""GET /openapi.json: a valid OpenAPI 3.1 document of every route the app has (and no other), and every route
fuzzed from it with schemathesis against a live server: no 5xx, no answer that breaks its own schema, no hang,
and the server's memory and connections back where they were."""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from embedserve.http.openapi import OPERATIONS

from serving import run_server
from tiny import MINILM_DIR, build_tiny_cross_encoder

KEY = "fuzz-key"
# Examples per operation and mode (valid bodies, then bodies that break the schema): with 20 operations of which
# 11 take a body, about 2,500 generated requests, plus schemathesis' own auth and method probes. Enough that every
# POST route answers both 200s and 400s (wrong types, empty arrays, bad enums, missing fields, unknown models); a
# longer hunt: EMBEDSERVE_FUZZ_EXAMPLES=400.
EXAMPLES = int(os.environ.get("EMBEDSERVE_FUZZ_EXAMPLES", "80"))


def server_process_stats(pid: int) -> tuple[int, int]:
    """(resident KiB, open TCP sockets) of the server process."""
    rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
    sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return rss, sockets


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """MiniLM (the default, answering TEI's routes) beside a tiny cross-encoder, with an API key."""
    root = tmp_path_factory.mktemp("openapi")
    build_tiny_cross_encoder(root / "rr", "bert", seed=1)
    with run_server(root, "--model", f"mini={MINILM_DIR}", "--model", f"rr={root / 'rr'}", "--api-key", KEY,
                    "--max-inputs-per-request", "64") as server:
        yield server


@pytest.fixture(scope="module")
def spec(live):
    r = httpx.get(live.url + "/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


def test_the_document_is_valid_openapi_3_1(spec):
    from openapi_spec_validator import validate

    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_every_route_is_documented_and_every_documented_route_exists(spec):
    from starlette.routing import Mount, Route

    from embedserve.config import Config, EngineConfig, ModelConfig
    from embedserve.http.app import create_app

    app = create_app(Config(engine=EngineConfig(model=ModelConfig(path=str(MINILM_DIR)))), engine=object())
    served = set()
    for route in app.routes:
        if isinstance(route, Mount):  # the Swagger UI files under /docs/assets, not an API route
            assert route.path == "/docs/assets"
            continue
        assert isinstance(route, Route)
        served |= {(route.path, m.lower()) for m in route.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    assert served == documented
    assert len(documented) >= 19


def test_each_operation_documents_its_errors_security_and_examples(spec):
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    embeddings = spec["paths"]["/v1/embeddings"]["post"]
    for code in ("400", "401", "404", "413", "429", "500", "503"):
        assert embeddings["responses"][code]["content"]["application/json"]["schema"] == error_ref
    assert "Retry-After" in embeddings["responses"]["429"]["headers"]
    assert embeddings["security"] == [{"bearer": []}]  # this server has an API key
    assert spec["components"]["securitySchemes"]["bearer"] == {**spec["components"]["securitySchemes"]["bearer"],
                                                               "type": "http", "scheme": "bearer"}
    assert spec["paths"]["/health"]["get"]["security"] == []  # probes carry no key
    body = embeddings["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/EmbeddingRequest"} and body["example"]["input"]
    # TEI's routes carry no model name: the default model (an embedder) answers them, so predict cannot; the
    # rerank route names its model, and rr can answer it.
    predict = spec["paths"]["/predict"]["post"]
    assert predict["x-embedserve-available"] is False and "the default model, which answers it, is embedding" \
        in predict["description"]
    assert "x-embedserve-available" not in spec["paths"]["/v1/rerank"]["post"]
    assert "x-embedserve-available" not in spec["paths"]["/embed"]["post"]
    # With several models a body's model must name one that can answer it.
    schemas = spec["components"]["schemas"]
    assert schemas["RerankRequest"]["properties"]["model"]["enum"] == ["rr"]
    assert schemas["EmbeddingRequest"]["properties"]["model"]["enum"] == ["mini"]
    assert "model" in schemas["RerankRequest"]["required"]


def test_a_route_no_served_model_can_answer_is_marked(tmp_path):
    with run_server(tmp_path) as server:  # the default MiniLM alone
        spec = httpx.get(server.url + "/openapi.json").json()
    rerank = spec["paths"]["/v1/rerank"]["post"]
    assert rerank["x-embedserve-available"] is False and "Here this server's models are embedding: it answers 400 " \
        "wrong_model_kind" in rerank["description"]
    assert "enum" not in spec["components"]["schemas"]["EmbeddingRequest"]["properties"]["model"]  # any name
    assert "x-embedserve-available" not in spec["paths"]["/v1/embeddings"]["post"]
    assert "401" not in spec["paths"]["/v1/embeddings"]["post"]["responses"]  # no key configured
    assert "none configured" in spec["components"]["securitySchemes"]["bearer"]["description"]


@pytest.fixture(scope="module")
def fuzz_schema(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


@pytest.fixture(scope="module")
def baseline(live):
    # Warm the paths the fuzzer will take (first requests allocate caches), then note where the server stands.
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(3):
        httpx.post(live.url + "/v1/embeddings", json={"model": "mini", "input": ["warm"] * 8}, headers=headers)
        httpx.post(live.url + "/v1/rerank", json={"model": "rr", "query": "q", "documents": ["a", "b"]},
                   headers=headers)
    return server_process_stats(live.proc.pid)


# Negative cases for operations that take a body: a GET without parameters has nothing to break.
CASES = [(op.method, op.path, mode) for op in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or op.request is not None]


def fuzz(schema, method: str, path: str, mode, examples: int) -> None:
    """Schemathesis' cases for one operation (valid bodies, or bodies that break the schema), each sent to the
    live server and checked by all of schemathesis' checks for that mode."""
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {KEY}"}
    # Every check but "schema-valid data is accepted": limits of the served model and the flags (its vocabulary
    # and width, the tokens an input may hold, the items a request may carry, a route the default model's kind
    # cannot answer) refuse some schema-valid bodies, with a documented 400.
    excluded = [schemathesis.checks.positive_data_acceptance]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(headers=headers, timeout=30, excluded_checks=excluded)

    check()


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {g}" for m, p, g in CASES])
def test_fuzz_every_route(fuzz_schema, baseline, method, path, mode):
    fuzz(fuzz_schema, method, path, mode, EXAMPLES)


def test_after_fuzzing_memory_and_connections_are_back(live, baseline, fuzz_schema):
    """Its own burst of every operation's cases first (5 each way, about 150 requests), so that it checks
    something whether or not the fuzz tests ran before it (alone, or in a shuffled order)."""
    rss_before, sockets_before = baseline
    for method, path, mode in CASES:
        fuzz(fuzz_schema, method, path, mode, 5)
    deadline = time.monotonic() + 30
    while True:
        rss, sockets = server_process_stats(live.proc.pid)
        if sockets <= sockets_before or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sockets <= sockets_before, (sockets, sockets_before)
    assert rss - rss_before < 150 * 1024, (rss, rss_before)  # KiB: no growth beyond the allocator's caches
    assert httpx.get(live.url + "/ready").status_code == 200
    assert " 500 " not in live.output() and "unhandled error" not in live.output()

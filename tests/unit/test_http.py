"""Handler logic against a fake engine: status mapping, readiness, and the error shape."""

from __future__ import annotations

import threading

import pytest
import torch
from starlette.testclient import TestClient

from embedserve.config import Config, EngineConfig, ModelConfig, ServerConfig
from embedserve.engine.interface import EngineInfo
from embedserve.errors import ContextLengthExceeded, EngineError, Overloaded
from embedserve.http.app import create_app


class FakeEngine:
    info = EngineInfo(name="fake", kind="embedding", dimensions=4, max_input_length=16, max_batch_tokens=64,
                      max_batch_requests=8, max_queue=16, id_limit=100, pooling="mean", labels=None, dtype="float32",
                      quantize="none", device="cpu", commit=None, tokenizer_workers=1)

    def __init__(self, behaviour=None):
        self.behaviour = behaviour
        self.calls = []

    async def embed(self, inputs, options):
        self.calls.append((inputs, options))
        if self.behaviour is not None:
            raise self.behaviour
        from embedserve.engine.interface import EmbedResult

        vectors = torch.arange(len(inputs) * 4, dtype=torch.float32).view(len(inputs), 4)
        return EmbedResult(vectors, [3] * len(inputs))


def client(engine, **server) -> TestClient:
    config = Config(engine=EngineConfig(model=ModelConfig(path="/nowhere")), server=ServerConfig(**server))
    return TestClient(create_app(config, engine=engine), raise_server_exceptions=False)


def body(**kw):
    return {"input": ["a", "b"], "model": "m", **kw}


def test_ok_response_shape_and_options_reach_the_engine():
    engine = FakeEngine()
    with client(engine, served_model_name="served") as c:
        r = c.post("/v1/embeddings", json=body(dimensions=3, normalize=True, truncate=False, prompt_name="query"))
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.0, 1.0, 2.0, 3.0]},
            {"object": "embedding", "index": 1, "embedding": [4.0, 5.0, 6.0, 7.0]},
        ],
        "model": "served",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }
    inputs, options = engine.calls[0]
    assert inputs == ["a", "b"]
    assert (options.dimensions, options.normalize, options.truncate, options.prompt_name) == (3, True, False, "query")


@pytest.mark.parametrize(
    "exc, status, type_, retry_after",
    [
        (Overloaded("queue full", retry_after_s=2.5), 429, "rate_limit_error", "3"),
        (EngineError("The forward pass failed (RuntimeError); the request can be retried."), 500, "server_error", None),
        (ContextLengthExceeded(256, 300, index=1), 400, "invalid_request_error", None),
        (RuntimeError("secret /internal/path.py line 3"), 500, "server_error", None),
    ],
)
def test_engine_errors_map_to_openai_errors(exc, status, type_, retry_after):
    with client(FakeEngine(exc)) as c:
        r = c.post("/v1/embeddings", json=body())
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["type"] == type_
    assert "/internal/path.py" not in err["message"]
    assert r.headers.get("retry-after") == retry_after


def test_not_ready_until_an_engine_is_there():
    config = Config(engine=EngineConfig(model=ModelConfig(path="/nowhere")))
    failures = []
    failed = threading.Event()
    app = create_app(config, on_load_failure=lambda e: (failures.append(e), failed.set()))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")  # the model at /nowhere never loads
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert failed.wait(30)
        assert c.post("/v1/embeddings", json=body()).status_code == 503
    assert failures and "does not exist" in str(failures[0])



def test_metrics_render_the_waiting_inputs_per_priority():
    from embedserve.engine.scheduler import Entry, Scheduler
    from embedserve.http.metrics import Metrics, ModelSnapshot, Snapshot

    s = Scheduler(max_batch_tokens=10, max_batch_requests=8, max_queue=100)
    s.add(1, [Entry(1, i, 5) for i in range(3)], priority=7, now=0.0)
    s.add(2, [Entry(2, 0, 5)], priority=0, now=0.0)
    snap = Snapshot([ModelSnapshot("m", "embedding", s.stats.waiting_inputs, s.stats.waiting_tokens, 0, 0, 100,
                                   False, dict(s.stats.waiting_by_priority))], 0, True)
    text = Metrics(lambda: snap).render().decode()
    assert 'embedserve_model_queue_inputs_by_priority{model="m",priority="0"} 1.0' in text
    assert 'embedserve_model_queue_inputs_by_priority{model="m",priority="7"} 3.0' in text

"""Operating the server: metrics, limits, faults, draining on SIGTERM, request ids and logs."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import signal
import time

import httpx

from polling import until_async
from serving import run_server


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/embeddings", json={"model": "m", **body}, timeout=120, **kw)


def test_metrics_move_as_requests_flow_and_headers_tell_the_times(server):
    before_req = metric(server, "embedserve_requests_total", '{route="/v1/embeddings",status="200"}')
    before_tok = metric(server, "embedserve_tokens_total")
    before_batches = metric(server, "embedserve_batch_inputs_count")
    r = post(server, {"input": ["one", "two three"]}, headers={"x-request-id": "req-42"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42"
    assert int(r.headers["x-total-tokens"]) == r.json()["usage"]["total_tokens"] == 7
    for h in ("x-queue-time", "x-inference-time"):
        assert float(r.headers[h]) >= 0
    assert metric(server, "embedserve_requests_total", '{route="/v1/embeddings",status="200"}') == before_req + 1
    assert metric(server, "embedserve_tokens_total") == before_tok + 7
    assert metric(server, "embedserve_batch_inputs_count") >= before_batches + 1
    assert post(server, {"input": []}).status_code == 400
    assert metric(server, "embedserve_requests_total", '{route="/v1/embeddings",status="400"}') >= 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("embedserve_queue_inputs", "embedserve_queue_tokens", "embedserve_batch_tokens_bucket",
                 "embedserve_queue_seconds_bucket", "embedserve_tokenize_seconds_bucket",
                 "embedserve_inference_seconds_bucket", "embedserve_request_seconds_bucket",
                 "embedserve_rejected_total", "embedserve_engine_errors_total", "embedserve_dropped_inputs_total"):
        assert name in text, name
    generated = post(server, {"input": "x"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    log = server.output()
    assert re.search(r"POST /v1/embeddings 200 kind=embedding model=all-MiniLM-L6-v2 inputs=2 tokens=7 queue_ms=[0-9.]+ total_ms=[0-9.]+ id=req-42", log)


def test_limits_each_return_their_status(tmp_path):
    flags = ("--max-inputs-per-request", "4", "--max-tokens-per-request", "50", "--max-body-bytes", "4000",
             "--truncate", "false", "--api-key", "secret", "--max-input-tokens", "40")
    with run_server(tmp_path, *flags) as s:
        auth = {"Authorization": "Bearer secret"}
        assert post(s, {"input": ["a"] * 4}, headers=auth).status_code == 200
        r = post(s, {"input": ["a"] * 5}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "input" and "at most 4" in r.text
        r = post(s, {"input": ["word " * 30, "word " * 30]}, headers=auth)  # 64 tokens > 50
        assert r.status_code == 400 and r.json()["error"]["code"] == "request_too_large"
        r = post(s, {"input": "word " * 45}, headers=auth)  # 47 tokens: past --max-input-tokens 40
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "maximum context length is 40 tokens" in r.json()["error"]["message"]
        r = post(s, {"input": "word " * 45, "truncate": True}, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 40
        assert post(s, {"input": "x" * 5000}, headers=auth).status_code == 413
        assert post(s, {"input": "x"}).status_code == 401
        # Probes and metrics stay open without the key.
        for path in ("/health", "/ready", "/metrics"):
            assert httpx.get(s.url + path).status_code == 200, path


def test_a_failing_forward_pass_fails_its_batch_with_500_and_the_server_keeps_serving(tmp_path):
    with run_server(tmp_path, "--fault-marker", "explode now") as s:
        r = post(s, {"input": ["fine", "explode now"]})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "engine_error"
        assert "injected" not in err["message"] and "Traceback" not in err["message"]
        assert post(s, {"input": ["fine", "still fine"]}).status_code == 200
        assert metric(s, "embedserve_engine_errors_total") == 1


async def wait_for_log(server, text: str, timeout: float = 60) -> None:
    """Until the server's log holds ``text`` (polled, ``timeout`` seconds at most)."""
    await until_async(lambda: text in server.output(), lambda: f"{text!r} in the log:\n{server.output()[-2000:]}",
                      timeout)


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    """The drain is held open by a request the test controls: its body is half sent when SIGTERM arrives, so
    it is in flight (accepted, reading its body) for as long as the test wants, whatever the machine's speed.
    49 ordinary requests are in flight beside it."""
    with run_server(tmp_path, "--max-batch-tokens", "512", "--shutdown-grace", "120") as s:
        texts = ["word " * 200] * 6
        body = json.dumps({"input": ["held open until the test says"], "model": "m"}).encode()
        host, port = s.url.removeprefix("http://").split(":")

        async def scenario():
            held_reader, held = await asyncio.open_connection(host, int(port))
            held.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:10])
            await held.drain()
            deadline = time.monotonic() + 60
            while metric(s, "embedserve_in_flight_requests") < 1:
                assert time.monotonic() < deadline, "the half-sent request never was in flight"
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(timeout=300) as c:
                flight = [asyncio.create_task(c.post(s.url + "/v1/embeddings", json={"input": texts, "model": "m"}))
                          for _ in range(49)]
                while metric(s, "embedserve_in_flight_requests") < 50:
                    assert time.monotonic() < deadline, "the 50 requests never were in flight together"
                    await asyncio.sleep(0.02)
                s.proc.send_signal(signal.SIGTERM)
                await wait_for_log(s, "shutdown requested: draining")
                late = await c.post(s.url + "/v1/embeddings", json={"input": "late", "model": "m"})
                ready = await c.get(s.url + "/ready")
                done = await asyncio.gather(*flight)
                assert s.proc.poll() is None  # the half-sent request still holds the drain open
                held.write(body[10:])
                await held.drain()
                answer = await held_reader.read()
                held.close()
                return done, late, ready, answer

        done, late, ready, answer = asyncio.run(scenario())
        assert [r.status_code for r in done] == [200] * 49
        assert [len(r.json()["data"]) for r in done] == [6] * 49
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"embedding"' in answer
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert ready.status_code == 503
        assert s.proc.wait(60) == 0
        assert "drained; stopping" in s.output()


def test_json_logs_one_object_per_line(tmp_path):
    with run_server(tmp_path, "--log-format", "json") as s:
        post(s, {"input": ["a", "b"]}, headers={"x-request-id": "json-1"})
    lines = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    access = next(x for x in lines if x.get("request_id") == "json-1")
    assert access["status"] == 200 and access["inputs"] == 2 and access["path"] == "/v1/embeddings"
    assert any("ready" in x["message"] for x in lines)


async def _heavy_then(s, *bodies):
    """Send a request that keeps the engine busy for many steps, then ``bodies`` together behind it, so that
    they arrive during a pass and share the next steps. Returns (heavy, *answers)."""
    async with httpx.AsyncClient(timeout=120) as c:
        heavy = asyncio.create_task(c.post(s.url + "/v1/embeddings", json={"input": ["word " * 250] * 24, "model": "m"}))
        deadline = time.monotonic() + 60
        while metric(s, "embedserve_running_inputs") < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        answers = await asyncio.gather(
            *(c.post(s.url + "/v1/embeddings", json={"model": "m", **b}) for b in bodies)
        )
        return (await heavy, *answers)


def test_out_of_memory_in_a_step_fails_only_the_input_that_does_not_fit_alone(tmp_path):
    flags = ("--fault-marker", "explode now", "--fault-kind", "oom", "--max-batch-tokens", "512")
    with run_server(tmp_path, *flags) as s:
        heavy, bad, good = asyncio.run(_heavy_then(s, {"input": ["b1", "explode now"]}, {"input": ["fine", "ok"]}))
        assert heavy.status_code == 200 and good.status_code == 200
        assert bad.status_code == 400
        err = bad.json()["error"]
        assert err["code"] == "input_too_large" and err["param"] == "input" and "--max-batch-tokens" in err["message"]
        assert "input[1]" in err["message"]
        # The good request shared a step with the bad one: that step was split, and it still got its vectors.
        assert metric(s, "embedserve_oom_splits_total") >= 1
        shared = [int(n) for n in re.findall(r"out of device memory in a step of (\d+) inputs", s.output())]
        assert shared and max(shared) >= 3
        ref = post(s, {"input": ["fine", "ok"]}).json()["data"]
        for a, b in zip(good.json()["data"], ref):
            assert max(abs(x - y) for x, y in zip(a["embedding"], b["embedding"])) < 1e-5
        assert metric(s, "embedserve_engine_errors_total") == 0
        assert httpx.get(s.url + "/health").status_code == 200


def test_a_fatal_device_error_answers_everything_turns_unhealthy_and_exits_non_zero(tmp_path):
    flags = ("--fault-marker", "explode now", "--fault-kind", "fatal", "--max-batch-tokens", "512",
             "--shutdown-grace", "2")
    with run_server(tmp_path, *flags) as s:
        heavy, bad, other = asyncio.run(_heavy_then(s, {"input": ["explode now"]}, {"input": ["x"] * 40}))
        statuses = [r.status_code for r in (heavy, bad, other)]
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "engine_error"
        assert set(statuses) <= {200, 500, 503}, statuses  # nothing hangs, nothing else
        assert 503 in statuses or other.status_code == 500  # what waited behind the failing step is refused
        # At once: the probes and every new request say 503 until the process goes.
        for path in ("/health", "/ready"):
            r = httpx.get(s.url + path)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_failed", path
        assert post(s, {"input": "later"}).status_code == 503
        assert s.proc.wait(30) == 3  # non-zero: Docker's restart policy and Kubernetes restart it
    out = s.output()
    assert "the engine stopped: RuntimeError: CUDA error" in out and "exiting with 3 in 2 s" in out
    # It waited out --shutdown-grace before stopping: by the server's own clock, between its two log lines.
    def stamp(line_text: str) -> float:
        line = next(x for x in out.splitlines() if line_text in x)
        return datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

    assert stamp("Shutting down") - stamp("exiting with 3 in 2 s") >= 1.99


def test_a_gpu_asked_for_and_not_there_stops_the_server_at_start_up(tmp_path):
    with run_server(tmp_path, env={"EMBEDSERVE_DEVICE": "cuda"}, wait_ready=False) as s:
        assert s.proc.wait(60) == 1
    assert "--device cuda:" in s.output() and "start-up failed" in s.output()


def test_a_request_path_cannot_forge_a_log_line(server):
    """The plain log escapes control characters in what a client sent: a decoded %0a in the path stays in the
    access line instead of starting a forged line of its own."""
    forged = "2099-01-01 00:00:00,000 INFO embedserve: FORGED"
    r = httpx.get(server.url + "/zz%0a" + forged.replace(" ", "%20") + "%0d%0aend", timeout=10)
    assert r.status_code == 404
    deadline = time.monotonic() + 10
    while "FORGED" not in server.output():
        assert time.monotonic() < deadline, "the request was never logged"
        time.sleep(0.05)
    lines = server.output().splitlines()
    assert not any(line.startswith("2099") or line.startswith("end") for line in lines)
    access = next(line for line in lines if "FORGED" in line)
    assert f"GET /zz\\x0a{forged}\\x0d\\x0aend 404" in access

"""Batch invariance under concurrent HTTP load, and a client that walks away."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time

import httpx
import numpy as np

from serving import run_server


def test_32_concurrent_clients_get_their_single_request_answers(server):
    rng = random.Random(5)
    pool = [f"text {i} " + " ".join(rng.choice("abcdefghij") * rng.randint(1, 5) for _ in range(rng.randint(1, 120)))
            for i in range(80)]
    mixes = [rng.sample(pool, rng.randint(1, 12)) for _ in range(32)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            async def one(texts, fmt):
                r = await c.post(server.url + "/v1/embeddings", json={"input": texts, "model": "m", "encoding_format": fmt})
                assert r.status_code == 200, r.text
                return r.json()

            concurrent = await asyncio.gather(*(one(m, "float" if i % 2 else "base64") for i, m in enumerate(mixes)))
            singles = {}
            for t in pool:
                singles[t] = (await one([t], "float"))["data"][0]["embedding"]
            return concurrent, singles

    concurrent, singles = asyncio.run(run())
    import base64

    for i, (mix, body) in enumerate(zip(mixes, concurrent)):
        assert [d["index"] for d in body["data"]] == list(range(len(mix)))
        for text, item in zip(mix, body["data"]):
            v = item["embedding"]
            if isinstance(v, str):
                v = np.frombuffer(base64.b64decode(v), "<f4")
            assert np.abs(np.asarray(v) - np.asarray(singles[text])).max() <= 1e-5, (i, text[:30])


def test_a_client_that_disconnects_has_its_queued_inputs_dropped(tmp_path):
    with run_server(tmp_path, "--max-batch-tokens", "512") as s:
        big = {"input": [f"word {i} " * 250 for i in range(1500)], "model": "m"}  # minutes of work on 2 cores

        def queued() -> float:
            found = re.search(r"^embedserve_queue_inputs ([0-9.]+)$", httpx.get(s.url + "/metrics").text, re.M)
            return float(found.group(1)) if found else 0.0

        async def walk_away():
            # The client leaves once the server's own metrics show the request queued: no client timeout to tune.
            async with httpx.AsyncClient(timeout=300) as client:
                request = asyncio.create_task(client.post(s.url + "/v1/embeddings", json=big))
                deadline = time.monotonic() + 120
                while await asyncio.to_thread(queued) < 1000:
                    assert time.monotonic() < deadline and not request.done(), "the request was never queued"
                    await asyncio.sleep(0.05)
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
            # The connection is closed with the client; the server notices and drops what is still queued.

        asyncio.run(walk_away())
        deadline = time.monotonic() + 120
        while "of its 1500 inputs dropped" not in s.output():
            assert time.monotonic() < deadline, s.output()[-2000:]
            time.sleep(0.05)
        # The server keeps answering, and the abandoned request's inputs left the queue.
        r = httpx.post(s.url + "/v1/embeddings", json={"input": "still here", "model": "m"}, timeout=120)
        assert r.status_code == 200
        dropped = [int(m) for m in re.findall(r"cancelled: (\d+) of its 1500 inputs dropped", s.output())]
        assert dropped and dropped[0] > 500, s.output()[-2000:]
        # And the metrics show it: nothing left queued, the drop counted.
        metrics = httpx.get(s.url + "/metrics").text
        assert re.search(r"^embedserve_queue_inputs 0\.0$", metrics, re.M)
        assert float(re.search(r"^embedserve_dropped_inputs_total ([0-9.]+)$", metrics, re.M).group(1)) == dropped[0]

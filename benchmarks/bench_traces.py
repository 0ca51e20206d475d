"""What tracing costs a request: the server over loopback with no trace endpoint, exporting to a live collector, and
with an endpoint where nothing listens (a collector that is down).

    python benchmarks/bench_traces.py [--seconds 5] [--windows 3]

Starts three ``embedserve serve`` processes (all-MiniLM-L6-v2, fp32 as the tests run it) on 127.0.0.1: without
``--otlp-endpoint``; with it pointing at the tests' collector (tests/service/collector.py, decoding every export);
and with it pointing at a closed port. Sends 32-text base64 requests from 4 clients (bench_http's client) in
``--windows`` windows of ``--seconds``, the three servers in turn within each round, and prints each one's median
tokens/s and p50 / p99 latency, the ratios to the untraced server, and the spans the collector received.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
from bench_http import in_turn, summarize  # noqa: E402  (it puts tests/ on the path)
from corpus import mixed_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per window")
    ap.add_argument("--windows", type=int, default=3, help="windows per server (medians are reported)")
    args = ap.parse_args()
    print(cpu_line())
    from collector import Collector

    corpus = mixed_corpus(1024)
    batches = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again before any server starts
    with Collector() as collector:
        seen = in_turn({"no endpoint": (), "live collector": ("--otlp-endpoint", collector.url),
                        "collector down": ("--otlp-endpoint", dead)}, batches, args.seconds, args.windows)
        spans = len(collector.spans)
    base = summarize(seen["no endpoint"])
    print(f"32 texts x 4 clients, base64, {args.windows} windows of {args.seconds:.0f} s (medians)")
    for name, windows in seen.items():
        r = summarize(windows)
        print(f"  {name:15s}: {r['tok_s']:7.0f} tok/s ({r['tok_s'] / base['tok_s']:.2f}x no endpoint), p50 "
              f"{r['p50']:6.1f} ms, p99 {r['p99']:6.1f} ms, {r['requests']} requests, {r['errors']} errors")
    print(f"  the live collector received {spans} spans")


if __name__ == "__main__":
    main()

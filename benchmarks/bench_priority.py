"""Request priority on one model: does a priority-0 query overtake a bulk flood, and does low priority still
finish under a high-priority flood?

    python benchmarks/bench_priority.py [--clients 16] [--probes 40] [--reversed-probes 5]

Starts ``embedserve serve`` (all-MiniLM-L6-v2, its defaults: --default-priority 100, --priority-share 0.125) on
127.0.0.1. Measures one full step (about 4,096 tokens, the median of three x-inference-times) and the probes'
idle latency (one-text requests at priority 0, one at a time). Then ``--clients`` clients flood the model with
32-text requests at priority 100 while the probes run at priority 0; the same flood with probes at priority 100
(what the probes get without a priority); and the roles reversed: the flood at priority 0, ``--reversed-probes``
probes at priority 100, which the share lets through once the flood's older inputs are done (about what
first-come-first-served would make them wait: the same flood's no-priority p50). Prints p50 / p99 of each, the
priority-0 p99 against idle p99 + 2 steps, and how many of each side's requests completed. Bounded: each flood stops
when its probes are done.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
from bench_fairness import p, probe, probe_under_flood, step_seconds  # noqa: E402  (it puts tests/ on the path)
from corpus import mixed_corpus  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--probes", type=int, default=40)
    ap.add_argument("--reversed-probes", type=int, default=5)
    args = ap.parse_args()
    print(cpu_line())
    from serving import run_server

    texts = mixed_corpus(600)
    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp), "--max-batch-tokens", "4096") as server:
        url, failures = server.url, []
        probe(url, "m", 5, failures, 0)  # warm the path
        step = step_seconds(url, "m", texts)
        idle = probe(url, "m", args.probes, failures, 0)
        first, counts = probe_under_flood(url, "m", "m", texts, args.clients, args.probes, failures,
                                          flood_priority=100, probe_priority=0)
        plain, plain_counts = probe_under_flood(url, "m", "m", texts, args.clients, args.probes, failures,
                                                flood_priority=100, probe_priority=100)
        last, last_counts = probe_under_flood(url, "m", "m", texts, args.clients, args.reversed_probes, failures,
                                              flood_priority=0, probe_priority=100)

    def line(name: str, times: list[float]) -> str:
        return f"{name}: p50 {1000 * p(times, 0.5):7.0f} ms, p99 {1000 * p(times, 0.99):7.0f} ms"

    bound = p(idle, 0.99) + 2 * step
    print(f"one step (about 4,096 tokens): {1000 * step:.0f} ms; {args.clients} flood clients x 32 texts")
    print("  " + line("probes idle, priority 0", idle))
    print("  " + line("flood at 100, probes at 0", first) + f"; idle p99 + 2 steps = {1000 * bound:.0f} ms: "
          f"p99 {'within' if p(first, 0.99) <= bound else 'past'} it ({(p(first, 0.99) - p(idle, 0.99)) / step:.1f} "
          f"steps over idle); flood requests answered meanwhile: {len(counts)}")
    print("  " + line("flood at 100, probes at 100 (no priority)", plain) + f"; flood requests answered: "
          f"{len(plain_counts)}; priority 0 cut the p99 {p(plain, 0.99) / p(first, 0.99):.1f}x")
    print("  " + line("reversed: flood at 0, probes at 100", last) + f"; all {len(last)} probes answered (max "
          f"{1000 * max(last):.0f} ms, {max(last) / p(plain, 0.5):.1f}x the no-priority p50), flood requests "
          f"answered: {len(last_counts)}")
    print(f"  failures: {len(failures)} {failures[:3]}")


if __name__ == "__main__":
    main()

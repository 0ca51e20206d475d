"""Chunked prefill vs one pass: a long input plus a steady stream of short requests, same process.

    python benchmarks/bench_chunked.py [--long-tokens 16384] [--rate 8] [--chunk 512] [--repeats 3]

A random Qwen3-shaped model (~98M parameters, last-token pooling) embeds one long input while 16-token
requests arrive at a fixed rate. Run both ways, in turn, ``--repeats`` times: chunking off (the peer: the long
input is one forward pass, and max-batch-tokens must hold it) and on (chunks of --chunk tokens beside the short
requests). Prints, as medians over the runs, the short requests' p50/p99 latency and the long input's total time
both ways, their ratios (on / off), and the long input's cosine between the two ways.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
from bench_models import build  # noqa: E402

from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from embedserve.engine.front import Engine  # noqa: E402


async def scenario(engine: Engine, long_ids: list[int], short_ids: list[list[int]], rate: float):
    latencies: list[float] = []

    async def short(ids: list[int]) -> None:
        t0 = time.perf_counter()
        await engine.embed([ids])
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    long_task = asyncio.create_task(engine.embed([long_ids]))
    shorts = []
    i = 0
    while not long_task.done():
        shorts.append(asyncio.create_task(short(short_ids[i % len(short_ids)])))
        i += 1
        await asyncio.sleep(1 / rate)  # the load generator's fixed arrival rate
    result = await long_task
    long_s = time.perf_counter() - t0
    await asyncio.gather(*shorts)
    latencies.sort()
    return result.vectors, long_s, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long-tokens", type=int, default=16384)
    ap.add_argument("--rate", type=float, default=8.0, help="short requests per second")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="runs each way, alternated (medians reported)")
    args = ap.parse_args()
    print(cpu_line())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; long input {args.long_tokens} tokens, "
          f"16-token requests at {args.rate}/s, chunk {args.chunk}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        build("qwen3", path, max_positions=args.long_tokens + 64)
        (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": args.long_tokens + 64}))
        g = torch.Generator().manual_seed(0)
        long_ids = torch.randint(1000, 30000, (args.long_tokens,), generator=g).tolist()
        short_ids = [torch.randint(1000, 30000, (16,), generator=g).tolist() for _ in range(64)]
        ways = {
            "off": SchedulerConfig(max_batch_tokens=args.long_tokens + 64, chunk_tokens=0),
            "on": SchedulerConfig(max_batch_tokens=4 * args.chunk, chunk_tokens=args.chunk),
        }
        runs: dict[str, list] = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, sched in ways.items():
                engine = Engine(EngineConfig(model=ModelConfig(path=str(path)), token_ids="model", scheduler=sched))
                engine.start()
                asyncio.run(engine.embed([short_ids[0]]))  # warm the small path
                try:
                    runs[name].append(asyncio.run(scenario(engine, long_ids, short_ids, args.rate)))
                finally:
                    engine.shutdown()

    def pct(lat: list[float], q: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]

    med = {}
    for name, results in runs.items():
        med[name] = {"long_s": statistics.median(r[1] for r in results),
                     "p50": statistics.median(pct(r[2], 0.5) for r in results),
                     "p99": statistics.median(pct(r[2], 0.99) for r in results)}
        m = med[name]
        print(f"chunking {name:3s}: long input {m['long_s']:7.2f} s; short requests p50 {m['p50']:8.1f} ms, "
              f"p99 {m['p99']:8.1f} ms (medians of {len(results)} runs, {sum(len(r[2]) for r in results)} requests)")
    cos = min(torch.nn.functional.cosine_similarity(on[0], off[0]).item()
              for on, off in zip(runs["on"], runs["off"]))
    on, off = med["on"], med["off"]
    print(f"on / off: short p99 {on['p99'] / off['p99']:.3f}, short p50 {on['p50'] / off['p50']:.3f}, long input "
          f"time {on['long_s'] / off['long_s']:.2f}; long vector cosine on vs off (lowest) {cos:.6f}")


if __name__ == "__main__":
    main()

"""Chunked prefill vs one pass: a long input plus a steady stream of short requests, same process.

    python benchmarks/bench_chunked.py [--long-tokens 16384] [--rate 8] [--chunk 1024]

A random Qwen3-shaped model (~98M parameters, last-token pooling) embeds one long input while 16-token
requests arrive at a fixed rate. Run twice: chunking off (the long input is one forward pass, and
max-batch-tokens must hold it) and on (chunks of --chunk tokens beside the short requests). Prints the
short requests' p50/p99 latency and the long input's total time both ways, and checks the long input's
vector is the same.
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
        rows = {}
        for name, sched in (
            ("off", SchedulerConfig(max_batch_tokens=args.long_tokens + 64, chunk_tokens=0)),
            ("on", SchedulerConfig(max_batch_tokens=4 * args.chunk, chunk_tokens=args.chunk)),
        ):
            engine = Engine(EngineConfig(model=ModelConfig(path=str(path)), token_ids="model", scheduler=sched))
            engine.start()
            asyncio.run(engine.embed([short_ids[0]]))  # warm the small path
            try:
                rows[name] = asyncio.run(scenario(engine, long_ids, short_ids, args.rate))
            finally:
                engine.shutdown()
    for name, (_, long_s, lat) in rows.items():
        p = lambda q: 1000 * lat[min(len(lat) - 1, int(q * len(lat)))]  # noqa: E731
        print(f"chunking {name:3s}: long input {long_s:7.2f} s; {len(lat)} short requests p50 {p(0.5):8.1f} ms, "
              f"p99 {p(0.99):8.1f} ms, median {1000 * statistics.median(lat):.1f} ms")
    (v_off, t_off, l_off), (v_on, t_on, l_on) = rows["off"], rows["on"]
    p99 = lambda lat: lat[min(len(lat) - 1, int(0.99 * len(lat)))]  # noqa: E731
    cos = torch.nn.functional.cosine_similarity(v_on, v_off).item()
    print(f"short p99 on/off: {p99(l_on) / p99(l_off):.3f} (target <= 0.2); long time on/off: {t_on / t_off:.2f} "
          f"(target <= 1.2); long vector cosine on vs off {cos:.6f}")


if __name__ == "__main__":
    main()

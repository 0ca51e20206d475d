"""PyLate's side of bench_multi_vector, run there in PyLate's own venv (.venv/pylate; the README's test command
builds it): ``python pylate_peer.py BASE OUT TEXTS.json REPEATS``.

Makes all-MiniLM-L6-v2's encoder (``BASE``, a folder without sentence-transformers modules) a ColBERT model with
``pylate.models.ColBERT`` (128-wide Dense, document_length 256, query_length 32), saves it to ``OUT`` for embedserve
to serve, then times ``encode(texts, is_query=False, batch_size=32)`` and ``encode(texts, is_query=True, ...)``:
prints one JSON line of each one's median seconds (after a warm-up), on the same threads embedserve gets.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_ms  # noqa: E402  (the standard library only, at import)


def main() -> None:
    base, out, texts_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    texts = json.loads(open(texts_path).read())
    from pylate import models

    torch.manual_seed(0)
    models.ColBERT(model_name_or_path=base, device="cpu", embedding_size=128, document_length=256,
                   query_length=32).save(out)
    model = models.ColBERT(model_name_or_path=out, device="cpu")
    seconds = {side: median_ms(lambda: model.encode(texts, is_query=side == "queries", batch_size=32,
                                                      show_progress_bar=False), repeats) / 1000
               for side in ("documents", "queries")}
    print(json.dumps({"threads": torch.get_num_threads(), **seconds}))


if __name__ == "__main__":
    main()
